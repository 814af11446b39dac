#!/usr/bin/env bash
# xnbd-server --readonly: the export advertises READ_ONLY, reads work
# (qemu-img compare, nbdcopy), every kind of write is refused - by the
# clients that honour the flag and, for raw requests that ignore it, by the
# server with EPERM - and the image is left byte-for-byte unchanged.
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img nbdcopy nbdinfo cmp
badinput=$XNBD_BUILD/tests/nbd-badinput
[ -x "$badinput" ] || fail "$badinput not built (run make)"

img=$TESTDIR/disk.img
make_image "$img" 64M 2
before=$(sha "$img")
sock=$TESTDIR/sock
start_server xnbd-server -r -u "$sock" "$img"
pid=$SERVER_PID
uri=$(nbd_unix_uri "$sock")

# Reads
qemu-img compare -f raw -F raw "$img" "$uri" || fail "read-only export reads differently"
nbdcopy "$uri" "$TESTDIR/copy.img"
same_content "$img" "$TESTDIR/copy.img"
ro=$(nbdinfo "$uri" | sed -n 's/^[[:space:]]*is_read_only: //p')
[ "$ro" = true ] || fail "nbdinfo reports is_read_only '$ro'"

# Clients that honour the flag refuse to write.
st=0; out=$(qemu-io -f raw -c 'write -P 0x55 0 64k' "$uri" 2>&1) || st=$?
[ "$st" -ne 0 ] || fail "qemu-io write to a read-only export succeeded: $out"
grep -qiE 'not permitted|permission denied|read-only' <<<"$out" ||
  fail "qemu-io did not report a permission error: $out"
st=0; out=$(nbdcopy "$TESTDIR/copy.img" "$uri" 2>&1) || st=$?
[ "$st" -ne 0 ] || fail "nbdcopy into a read-only export succeeded"

# Raw requests that ignore the flag: the server itself must refuse them
# (WRITE, TRIM, WRITE_ZEROES -> EPERM, payload consumed, READ_ONLY flag).
"$badinput" --unix "$sock" --size 64M --readonly ||
  fail "nbd-badinput --readonly reported failures"

assert_alive "$pid"
stop_ok "$pid" xnbd-server
[ "$(sha "$img")" = "$before" ] || fail "the read-only image was modified"
echo OK
