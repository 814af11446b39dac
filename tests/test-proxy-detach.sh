#!/usr/bin/env bash
# I7 detach is safe.  Part 1: detach is refused while blocks are missing
# (ok:false, the message gives the count); after cache-all completes it is
# accepted; with the source then killed, clients still read and write the
# whole disk correctly and the state is "detached".  Part 2: on a fresh
# proxy, detach --force with blocks missing: the missing blocks then read as
# I/O errors (promptly, no source wait) while present blocks read correctly.
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img cmp

M=$((1024 * 1024))
src=$TESTDIR/src.img model=$TESTDIR/model.img
make_image "$src" 32M 7
cp --sparse=always "$src" "$model"
src_sha=$(sha "$src")
ssock=$TESTDIR/src.sock psock=$TESTDIR/proxy.sock ctlsock=$TESTDIR/ctl
uri=$(nbd_unix_uri "$psock")

# ---- part 1: refused, then accepted once complete
start_server xnbd-server -r -u "$ssock" "$src"
src_pid=$SERVER_PID
start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$TESTDIR/cache.img" \
  --bitmap "$TESTDIR/cache.bitmap" --control "$ctlsock" -u "$psock"
p1=$PROXY_PID
wait_state "$ctlsock" proxying 30
qio "$uri" "read 0 1M"
missing=$(proxy_status "$ctlsock" blocks.missing)
[ "$missing" -gt 0 ] || fail "no block missing after reading 1 MiB of 32"
ctl_err "$ctlsock" detach
echo "detach with $missing blocks missing: $CTL_ERROR"
grep -qw -- "$missing" <<<"$CTL_ERROR" ||
  fail "the refusal does not give the number of missing blocks ($missing): $CTL_ERROR"
[ "$(proxy_status "$ctlsock" state)" = proxying ] || fail "a refused detach changed the state"

w1=("write -P 0x71 $((30 * M + 3)) 5000" "write -P 0x72 $((2 * M)) 1M")
qio "$uri" "${w1[@]}"
qio "$model" "${w1[@]}"
ctl_ok "$ctlsock" cache-all
wait_state "$ctlsock" complete 60
ctl_ok "$ctlsock" detach
wait_state "$ctlsock" detached 10
stop_server "$src_pid" KILL || true
rm -f "$ssock"

w2=("write -P 0x73 $((17 * M + 4000)) 200" "write -z $((9 * M)) 1M" "write -P 0x74 $((32 * M - 4096)) 4096")
qio "$uri" "${w2[@]}" "read -P 0x71 $((30 * M + 3)) 5000" "read -P 0x72 $((2 * M)) 1M"
qio "$model" "${w2[@]}"
qemu-img compare -f raw -F raw "$model" "$uri" || fail "after detach the disk differs from the model"
s=$(ctl_ok "$ctlsock" status)
[ "$(json_get "$s" state)" = detached ] || fail "state is not detached: $s"
[ "$(json_get "$s" connections.up)" -eq 0 ] || fail "source connections still up after detach: $s"
ctl_ok "$ctlsock" detach >/dev/null   # detaching again is harmless
assert_alive "$p1"
stop_ok "$p1" xnbd-proxy
same_content "$TESTDIR/cache.img" "$model"

# ---- part 2: detach --force on a fresh proxy
cp --sparse=always "$src" "$model"
start_server xnbd-server -r -u "$ssock" "$src"
src_pid=$SERVER_PID
start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$TESTDIR/cache2.img" \
  --bitmap "$TESTDIR/cache2.bitmap" --control "$ctlsock" -u "$psock"
p2=$PROXY_PID
wait_state "$ctlsock" proxying 30
w3=("write -P 0x75 $((4 * M + 100)) 1000")
qio "$uri" "read 0 2M" "read $((20 * M)) 1M" "${w3[@]}"
qio "$model" "${w3[@]}"
missing=$(proxy_status "$ctlsock" blocks.missing)
ctl_err "$ctlsock" detach
r=$(ctl_ok "$ctlsock" "detach --force")
echo "detach --force with $missing blocks missing: $r"
wait_state "$ctlsock" detached 10
stop_server "$src_pid" KILL || true
rm -f "$ssock"

# Present blocks read correctly.
for range in 0:2M $((20 * M)):1M $((4 * M)):4096; do
  off=${range%%:*} len=${range##*:}
  want=$(qemu-io -f raw -c "read -v $off $len" "$model" | grep -v '^read\|ops/sec' | sha256sum)
  got=$(timeout 20 qemu-io -f raw -c "read -v $off $len" "$uri" | grep -v '^read\|ops/sec' | sha256sum)
  [ "$got" = "$want" ] || fail "after detach --force, present range $off+$len differs from the model"
done
# Missing blocks fail with an I/O error, promptly.
for off in $((10 * M)) $((31 * M + 4096)) $((2 * M + 4096)); do
  start=$SECONDS st=0
  out=$(timeout 20 qemu-io -f raw -c "read $off 4096" "$uri" 2>&1) || st=$?
  echo "read of missing block at $off after detach --force: exit $st: $out"
  [ "$st" -ne 124 ] || fail "a read of a missing block hung after detach --force"
  grep -qi 'Input/output error' <<<"$out" ||
    fail "a read of missing block $off after detach --force did not fail with EIO: $out"
  [ $((SECONDS - start)) -le 5 ] || fail "the failing read took $((SECONDS - start)) s"
done
s=$(ctl_ok "$ctlsock" status)
echo "status after detach --force: $s"
[ "$(json_get "$s" state)" = detached ] || fail "state is not detached after detach --force: $s"
grep -qi 'force' "$PROXY_LOG" || fail "detach --force was not logged"
assert_alive "$p2"
[ "$(sha "$src")" = "$src_sha" ] || fail "the source image changed (I6)"
echo OK
