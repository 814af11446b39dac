#!/usr/bin/env bash
# qemu-img convert both ways through xnbd-server, checked with qemu-img
# compare and cmp: image -> NBD (into an empty sparse export), NBD -> raw
# file, NBD -> qcow2; qemu-img info reports the right virtual size.
source "$(dirname "$0")/functions.sh"
requires qemu-img cmp

src=$TESTDIR/src.img
dst=$TESTDIR/dst.img
make_image "$src" 64M 3
make_sparse_image "$dst" 64M
# Prefill the destination with data so that holes in src must be written
# as zeros, not just skipped.
make_image "$dst" 64M 9

start_server xnbd-server -u "$TESTDIR/dst.sock" "$dst"
dst_pid=$SERVER_PID
dst_uri=$(nbd_unix_uri "$TESTDIR/dst.sock")

# image -> nbd
qemu-img convert -n -f raw -O raw "$src" "$dst_uri"
qemu-img compare -f raw -F raw "$src" "$dst_uri" || fail "compare after convert to nbd"

# nbd -> file (raw and qcow2), reading the export we just wrote
qemu-img convert -f raw -O raw "$dst_uri" "$TESTDIR/out.raw"
same_content "$src" "$TESTDIR/out.raw"
qemu-img convert -f raw -O qcow2 "$dst_uri" "$TESTDIR/out.qcow2"
qemu-img compare -f qcow2 -F raw "$TESTDIR/out.qcow2" "$src" || fail "qcow2 copy differs"

# qemu-img compare must notice a difference (the check can fail).
printf 'X' | dd of="$TESTDIR/out.raw" bs=1 seek=$((40 * 1024 * 1024 + 17)) conv=notrunc status=none
if qemu-img compare -q -f raw -F raw "$TESTDIR/out.raw" "$dst_uri"; then
  fail "qemu-img compare missed a changed byte"
fi

size=$(qemu-img info --output=json -f raw "$dst_uri" | sed -n 's/.*"virtual-size": *\([0-9]*\).*/\1/p')
[ "$size" = $((64 * 1024 * 1024)) ] || fail "qemu-img info virtual-size '$size'"

assert_alive "$dst_pid"
stop_ok "$dst_pid" xnbd-server
same_content "$src" "$dst"
echo OK
