#!/usr/bin/env bash
# Once every block is present, the proxy needs no source: after the copy
# completes, the proxy and the source are stopped, and a proxy started with
# the same cache and bitmap but WITHOUT --target serves the disk, reads and
# writes, equal to the model.  Also with a --target that is down (the source
# is not contacted when the bitmap is complete).
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img cmp

M=$((1024 * 1024))
src=$TESTDIR/src.img model=$TESTDIR/model.img
make_image "$src" 32M 6
cp --sparse=always "$src" "$model"
src_sha=$(sha "$src")
ssock=$TESTDIR/src.sock psock=$TESTDIR/proxy.sock ctlsock=$TESTDIR/ctl
local_args=(--cache "$TESTDIR/cache.img" --bitmap "$TESTDIR/cache.bitmap"
            --control "$ctlsock" -u "$psock")
uri=$(nbd_unix_uri "$psock")

start_server xnbd-server -r -u "$ssock" "$src"
src_pid=$SERVER_PID
start_proxy --target "$(nbd_unix_uri "$ssock")" "${local_args[@]}" --cache-all
w1=("write -P 0x61 $((31 * M + 17)) 3000" "write -P 0x62 $((5 * M)) 64k")
qio "$uri" "${w1[@]}"
qio "$model" "${w1[@]}"
wait_state "$ctlsock" complete 60
qemu-img compare -f raw -F raw "$model" "$uri" || fail "the disk differs from the model once complete"
stop_ok "$PROXY_PID" xnbd-proxy
stop_server "$src_pid" || true
rm -f "$ssock"

# No --target.
start_proxy "${local_args[@]}"
s=$(ctl_ok "$ctlsock" status)
echo "restarted without a source: $s"
state=$(json_get "$s" state)
case $state in complete|detached) ;; *) fail "state is '$state' without a source, expected complete or detached" ;; esac
[ "$(json_get "$s" blocks.missing)" -eq 0 ] || fail "blocks missing after the restart: $s"
w2=("write -P 0x63 $((7 * M + 1)) 10000" "write -z $((12 * M)) 2M")
qio "$uri" "${w2[@]}" "read -P 0x61 $((31 * M + 17)) 3000" "read -P 0x62 $((5 * M)) 64k"
qio "$model" "${w2[@]}"
qemu-img compare -f raw -F raw "$model" "$uri" || fail "served without a source, the disk differs from the model"
[ "$(json_get "$(ctl_ok "$ctlsock" status)" bytes.fetched)" -eq 0 ] ||
  fail "a proxy without a source reports bytes fetched"
stop_ok "$PROXY_PID" xnbd-proxy

# A --target that is down does not stop a complete proxy either.
start_proxy --target "$(nbd_unix_uri "$ssock")" "${local_args[@]}"
w3=("write -P 0x64 $((20 * M - 5)) 10")
qio "$uri" "${w3[@]}"
qio "$model" "${w3[@]}"
qemu-img compare -f raw -F raw "$model" "$uri" || fail "with a dead --target, the disk differs from the model"
stop_ok "$PROXY_PID" xnbd-proxy
same_content "$TESTDIR/cache.img" "$model"
[ "$(sha "$src")" = "$src_sha" ] || fail "the source image changed (I6)"
echo OK
