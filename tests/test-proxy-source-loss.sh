#!/usr/bin/env bash
# A lost source is survived.  Part 1: during a rate-capped background copy
# the source is killed; the state becomes source-lost; present blocks still
# read and write; a client read of a missing block waits (does not fail);
# when the source is restarted on the same socket, that read completes with
# the right data, the copy completes and the disk equals the model.
# Part 2: with --source-timeout 3 and the source gone for good, a read of a
# missing block fails with EIO within 20 s, present blocks still read, and
# the proxy keeps running.
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img cmp

M=$((1024 * 1024))
src=$TESTDIR/src.img model=$TESTDIR/model.img
make_image "$src" 64M 8
cp --sparse=always "$src" "$model"
src_sha=$(sha "$src")
ssock=$TESTDIR/src.sock psock=$TESTDIR/proxy.sock ctlsock=$TESTDIR/ctl
uri=$(nbd_unix_uri "$psock")

# hexdump FILE-OR-URI OFF LEN: the bytes as qemu-io prints them.
hexdump_of () {
  qemu-io -f raw -c "read -v $2 $3" "$1" | grep -v '^read\|ops/sec'
}

# ---- part 1
start_server xnbd-server -r -u "$ssock" "$src"
src_pid=$SERVER_PID
start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$TESTDIR/cache.img" \
  --bitmap "$TESTDIR/cache.bitmap" --control "$ctlsock" -u "$psock" \
  --cache-all --bg-rate 8M --source-timeout 120
p1=$PROXY_PID
qio "$uri" "read $((33 * M)) 64k"         # surely present from now on
wait_status "$ctlsock" 30 'j["state"] == "proxying" and j["blocks"]["present"] > 0'
stop_server "$src_pid" KILL || true
rm -f "$ssock"
wait_state "$ctlsock" source-lost 30
missing=$(proxy_status "$ctlsock" blocks.missing)
echo "source killed with $missing blocks missing"
[ "$missing" -gt $((16 * M / 4096)) ] || fail "the copy went too fast ($missing blocks missing)"

# Present blocks keep working.
[ "$(timeout 20 qemu-io -f raw -c "read -v $((33 * M)) 64k" "$uri" | grep -v '^read\|ops/sec')" = \
  "$(hexdump_of "$model" $((33 * M)) 64k)" ] || fail "a present block read wrongly while the source is lost"
w1=("write -P 0x91 $((33 * M + 100)) 200")
timeout 20 qemu-io -f raw -c "${w1[0]}" "$uri" >/dev/null || fail "a write to a present block failed while the source is lost"
qio "$model" "${w1[@]}"

# A read of a missing block (near the end: the copy runs from 0 up) waits.
bg_out=$TESTDIR/bg-read.out
qemu-io -f raw -c "read -v $((62 * M + 4096)) 8k" "$uri" >"$bg_out" 2>&1 &
bg_pid=$!
kill_bg () { [ -z "$bg_pid" ] || kill "$bg_pid" 2>/dev/null || true; }
cleanup_fn kill_bg
wait_status "$ctlsock" 20 'j["ondemand_waiting"] > 0'
server_alive "$bg_pid" || { cat "$bg_out"; fail "the read of a missing block did not wait for the source"; }
[ "$(proxy_status "$ctlsock" state)" = source-lost ] || fail "state changed while the source is down"

# Source back on the same socket: the read completes with the right data.
start_server xnbd-server -r -u "$ssock" "$src"
src_pid=$SERVER_PID
for (( i = 0; i < 600; i++ )); do
  server_alive "$bg_pid" || break
  sleep 0.1
done
server_alive "$bg_pid" && fail "the waiting read did not complete within 60 s of the source's return"
st=0; wait "$bg_pid" || st=$?
bg_pid=
[ "$st" -eq 0 ] || { cat "$bg_out"; fail "the waiting read exited with status $st"; }
grep -qi 'error\|fail' "$bg_out" && { cat "$bg_out"; fail "the waiting read failed"; }
[ "$(grep -v '^read\|ops/sec' "$bg_out")" = "$(hexdump_of "$model" $((62 * M + 4096)) 8k)" ] ||
  fail "the read that waited for the source returned wrong data"
wait_state "$ctlsock" complete 120
qemu-img compare -f raw -F raw "$model" "$uri" || fail "after the source came back, the disk differs from the model"
s=$(ctl_ok "$ctlsock" status)
echo "after recovery: $s"
stop_ok "$p1" xnbd-proxy
same_content "$TESTDIR/cache.img" "$model"

# ---- part 2: --source-timeout 3, source gone for good
start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$TESTDIR/cache2.img" \
  --bitmap "$TESTDIR/cache2.bitmap" --control "$ctlsock" -u "$psock" \
  --source-timeout 3
p2=$PROXY_PID
wait_state "$ctlsock" proxying 30
qio "$uri" "read 0 1M"
stop_server "$src_pid" TERM || true
wait_state "$ctlsock" source-lost 30
start=$(date +%s.%N) st=0
out=$(timeout 30 qemu-io -f raw -c "read $((40 * M)) 4096" "$uri" 2>&1) || st=$?
secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
echo "read of a missing block with the source gone: exit $st after $secs s: $out"
[ "$st" -ne 124 ] || fail "a read of a missing block still waited after 30 s with --source-timeout 3"
grep -qi 'Input/output error' <<<"$out" || fail "the read of a missing block did not fail with EIO: $out"
awk -v s="$secs" 'BEGIN { exit !(s <= 20) }' || fail "the read took $secs s to fail, more than 20"
[ "$(timeout 20 qemu-io -f raw -c "read -v 4096 8k" "$uri" | grep -v '^read\|ops/sec')" = \
  "$(hexdump_of "$model" 4096 8k)" ] || fail "a present block read wrongly with the source gone"
assert_alive "$p2"
[ "$(proxy_status "$ctlsock" state)" = source-lost ] || fail "state is not source-lost"
[ "$(sha "$src")" = "$src_sha" ] || fail "the source image changed (I6)"
echo OK
