#!/usr/bin/env bash
# nbdfuse: the export mounted as a file through FUSE reads back with the
# image's checksum; writes through the mount land in the image.
source "$(dirname "$0")/functions.sh"
requires nbdfuse fusermount3 sha256sum cmp
requires_path /dev/fuse
# A container may have the node but not the right to use it.
if ! { exec 9<>/dev/fuse; } 2>/dev/null; then
  skip "/dev/fuse cannot be opened here"
fi
exec 9>&-

img=$TESTDIR/disk.img
model=$TESTDIR/model.img
make_image "$img" 32M 4
cp --sparse=always "$img" "$model"
sock=$TESTDIR/sock
start_server xnbd-server -u "$sock" "$img"
pid=$SERVER_PID

mnt=$TESTDIR/mnt
mkdir "$mnt"
nbdfuse -P "$TESTDIR/nbdfuse.pid" "$mnt" --unix "$sock" >"$TESTDIR/nbdfuse.log" 2>&1 &
fuse_pid=$!
cleanup_fn fusermount3 -u -z "$mnt"
nbdfuse_up () {
  server_alive "$fuse_pid" || { cat "$TESTDIR/nbdfuse.log" >&2; fail "nbdfuse exited"; }
  [ -s "$TESTDIR/nbdfuse.pid" ]
}
wait_for nbdfuse_up || fail "nbdfuse did not mount $mnt"

file=$mnt/nbd
[ "$(stat -c %s "$file")" -eq $((32 * 1024 * 1024)) ] || fail "mounted file has size $(stat -c %s "$file")"
[ "$(sha "$file")" = "$(sha "$img")" ] || fail "sha256 through nbdfuse differs from the image"

# Writes through the mount (aligned, unaligned, at the end), mirrored on
# the model.
patch=$TESTDIR/patch
head -c 300000 /dev/urandom >"$patch"
for f in "$file" "$model"; do
  dd if="$patch" of="$f" bs=1M seek=5 conv=notrunc,fsync status=none iflag=fullblock
  dd if="$patch" of="$f" bs=1 seek=1234567 count=777 conv=notrunc status=none
  dd if="$patch" of="$f" bs=4096 seek=$((32 * 256 - 1)) count=1 conv=notrunc,fsync status=none
done
sync "$file" 2>/dev/null || true
[ "$(sha "$file")" = "$(sha "$model")" ] || fail "data read back through nbdfuse differs after writes"

fusermount3 -u "$mnt"
fuse_gone () { ! server_alive "$fuse_pid"; }
wait_for fuse_gone || fail "nbdfuse still running after unmount"
wait "$fuse_pid" || fail "nbdfuse exited with status $?"

assert_alive "$pid"
stop_ok "$pid" xnbd-server
same_content "$img" "$model"
echo OK
