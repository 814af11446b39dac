#!/usr/bin/env bash
# The migration engine's export as a file through nbdfuse (how a VM's RAM
# is mapped at the destination in a memory-image migration): the file reads
# as the source while blocks are still missing (on-demand fetches through
# FUSE), writes through the file stay local and read back, and after
# cache-all the disk equals the model.  Runs through both front ends
# (xnbd-proxy, and the nbdkit plugin as test-proxy-nbdfuse@nbdkit).
source "$(dirname "$0")/functions.sh"
requires nbdfuse fusermount3 qemu-img cmp
requires_path /dev/fuse
if ! { exec 9<>/dev/fuse; } 2>/dev/null; then
  skip "/dev/fuse cannot be opened here"
fi
exec 9>&-

src=$TESTDIR/src.img model=$TESTDIR/model.img
make_image "$src" 32M 6
cp --sparse=always "$src" "$model"
ssock=$TESTDIR/src.sock psock=$TESTDIR/proxy.sock ctlsock=$TESTDIR/ctl
start_server xnbd-server -r -u "$ssock" "$src"
start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$TESTDIR/cache.img" \
  --bitmap "$TESTDIR/cache.bitmap" --control "$ctlsock" -u "$psock"
wait_state "$ctlsock" proxying 30

mnt=$TESTDIR/mnt
mkdir "$mnt"
nbdfuse -P "$TESTDIR/nbdfuse.pid" "$mnt" --unix "$psock" >"$TESTDIR/nbdfuse.log" 2>&1 &
fuse_pid=$!
cleanup_fn fusermount3 -u -z "$mnt"
nbdfuse_up () {
  server_alive "$fuse_pid" || { cat "$TESTDIR/nbdfuse.log" >&2; fail "nbdfuse exited"; }
  [ -s "$TESTDIR/nbdfuse.pid" ]
}
wait_for nbdfuse_up || fail "nbdfuse did not mount $mnt"
file=$mnt/nbd

# Reads of missing blocks come from the source, through FUSE.
cmp <(dd if="$file" bs=1M skip=3 count=2 status=none) \
    <(dd if="$src" bs=1M skip=3 count=2 status=none) ||
  fail "reading missing blocks through nbdfuse differs from the source"
[ "$(proxy_status "$ctlsock" fetches.ondemand)" -gt 0 ] || fail "no on-demand fetch for the reads"
# Writes through the file (partial and whole blocks) stay local.
patch=$TESTDIR/patch
head -c 300000 /dev/urandom >"$patch"
for f in "$file" "$model"; do
  dd if="$patch" of="$f" bs=1M seek=9 conv=notrunc,fsync status=none iflag=fullblock
  dd if="$patch" of="$f" bs=1 seek=1234567 count=777 conv=notrunc,fsync status=none
done
ctl_ok "$ctlsock" cache-all >/dev/null
wait_state "$ctlsock" complete 60
cmp "$file" "$model" || fail "the file through nbdfuse differs from the model after cache-all"
fusermount3 -u "$mnt"
wait "$fuse_pid" 2>/dev/null || true
qemu-img compare -q -f raw -F raw "$model" "$(nbd_unix_uri "$psock")" ||
  fail "the export differs from the model"
[ "$(sha "$src")" != "$(sha "$model")" ] || fail "the writes did not change the model"
echo OK
