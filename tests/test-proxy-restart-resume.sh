#!/usr/bin/env bash
# Restarting the proxy with the same cache and bitmap resumes: blocks made
# present before the restart (by client reads and whole-block writes) are
# not fetched again.  After a full read following the restart, the bytes
# fetched plus the bytes skipped as zero equal exactly the blocks missing at
# restart, and the disk equals the model (source + the writes made before
# and after the restart).
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img nbdcopy cmp

M=$((1024 * 1024)) bs=4096
src=$TESTDIR/src.img model=$TESTDIR/model.img copy=$TESTDIR/copy.img
make_image "$src" 48M 5
cp --sparse=always "$src" "$model"
src_sha=$(sha "$src")
ssock=$TESTDIR/src.sock psock=$TESTDIR/proxy.sock ctlsock=$TESTDIR/ctl
start_server xnbd-server -r -u "$ssock" "$src"
args=(--target "$(nbd_unix_uri "$ssock")" --cache "$TESTDIR/cache.img"
      --bitmap "$TESTDIR/cache.bitmap" --control "$ctlsock" -u "$psock")
uri=$(nbd_unix_uri "$psock")

start_proxy "${args[@]}"
wait_state "$ctlsock" proxying 30
# Some blocks fetched by reads, some made present by whole-block writes, one
# partial write (fetch, then modify).
before=("write -P 0x5a $((30 * M)) 256k" "write -P 0xa5 $((33 * M + 100)) 5000"
        "write -z $((40 * M)) 1M")
qio "$uri" "read 0 3M" "read $((10 * M + 4096)) 1M" "read $((21 * M)) 2M" \
  "read $((47 * M)) 1M" "${before[@]}"
qio "$model" "${before[@]}"
s1=$(ctl_ok "$ctlsock" status)
present1=$(json_get "$s1" blocks.present) total=$(json_get "$s1" blocks.total)
echo "before the restart: $present1 of $total blocks present"
[ "$total" -eq $((48 * M / bs)) ] || fail "blocks.total is $total, expected $((48 * M / bs))"
least=$(((8 * M + 256 * 1024) / bs))
[ "$present1" -ge "$least" ] && [ "$present1" -lt "$total" ] ||
  fail "$present1 blocks present after the reads and writes, expected at least $least and fewer than $total"
stop_ok "$PROXY_PID" xnbd-proxy

start_proxy "${args[@]}"
wait_state "$ctlsock" proxying 30
s2=$(ctl_ok "$ctlsock" status)
present2=$(json_get "$s2" blocks.present)
[ "$present2" -eq "$present1" ] ||
  fail "after the restart $present2 blocks are present, expected $present1 (SIGTERM must persist the bitmap)"
[ "$(json_get "$s2" bytes.fetched)" -eq 0 ] ||
  fail "the restarted proxy fetched $(json_get "$s2" bytes.fetched) bytes before any client read"

# Writes after the restart (to present blocks: no fetch), then one full read.
after=("write -P 0x3c $((2 * M + 10)) 100" "write -P 0xc3 $((21 * M + 4096)) 8k")
qio "$uri" "${after[@]}" "read -P 0x5a $((30 * M)) 256k" "read -P 0xa5 $((33 * M + 100)) 5000"
qio "$model" "${after[@]}"
nbdcopy "$uri" "$copy" || fail "nbdcopy from the proxy failed"
same_content "$copy" "$model"

s3=$(ctl_ok "$ctlsock" status)
echo "after the full read: $s3"
present3=$(json_get "$s3" blocks.present)
fetched=$(json_get "$s3" bytes.fetched) zero=$(json_get "$s3" bytes.zero_skipped)
[ "$present3" -eq "$total" ] || fail "after a full read $present3 of $total blocks are present"
# Every block missing at restart was fetched or skipped as zero exactly
# once; none present at restart was fetched again.
remaining=$(( (total - present2) * bs )) got=$(( fetched + zero ))
echo "missing at restart: $remaining bytes; fetched $fetched + zero-skipped $zero = $got"
[ "$fetched" -le "$remaining" ] ||
  fail "fetched $fetched bytes after the restart, more than the $remaining bytes missing at restart (present blocks fetched again)"
[ "$got" -eq "$remaining" ] ||
  fail "fetched + zero-skipped = $got bytes after the restart, expected exactly the $remaining bytes ($((total - present2)) blocks) missing at restart"
qemu-img compare -f raw -F raw "$model" "$uri" || fail "the proxy's disk differs from the model"
stop_ok "$PROXY_PID" xnbd-proxy
same_content "$TESTDIR/cache.img" "$model"
[ "$(sha "$src")" = "$src_sha" ] || fail "the source image changed (I6)"
echo OK
