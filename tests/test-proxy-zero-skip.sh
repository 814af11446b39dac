#!/usr/bin/env bash
# Zeros do not cross the wire: the source is a mostly sparse 64 MiB image
# (a few data extents) served by xnbd-server.  After cache-all completes,
# bytes.zero_skipped > 0, bytes.fetched covers the data but is well under
# half the image, fetched + zero-skipped = the image size (each block once),
# the cache image stays sparse, and the disk equals the source.
# Then the same cache, started over (--clear-bitmap) from another source
# whose zeros lie where the cache holds the first one's data: those blocks
# must read as zero (the cache is punched there, not trusted to be a hole),
# while zeros where the cache is a hole need no write at all.
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img cmp

M=$((1024 * 1024)) size=$((64 * M))
src=$TESTDIR/src.img
make_sparse_image "$src" 64M
make_image "$TESTDIR/data.img" 4M 0          # random, zero, text, hole MiBs
data=0
for ext in $((1 * M)):256K:0 $((9 * M + 4096)):64K:2097152 $((20 * M)):1M:0 \
           $((33 * M)):128K:2097152 $((47 * M)):512K:65536 $((64 * M - 8192)):8K:0; do
  IFS=: read -r off len from <<<"$ext"
  len=$(to_bytes "$len")
  dd if="$TESTDIR/data.img" of="$src" bs=4096 skip=$((from / 4096)) seek=$((off / 4096)) \
     count=$((len / 4096)) conv=notrunc status=none
  data=$((data + len))
done
rm -f "$TESTDIR/data.img"
[ "$(stat -c %s "$src")" -eq "$size" ] || fail "the source image is not $size bytes"
alloc=$(( $(stat -c %b "$src") * $(stat -c %B "$src") ))
echo "source: $size bytes, $data bytes written, $alloc bytes allocated"
[ "$alloc" -lt $((size / 4)) ] || skip "the filesystem of $TESTDIR does not keep files sparse"
src_sha=$(sha "$src")

ssock=$TESTDIR/src.sock psock=$TESTDIR/proxy.sock ctlsock=$TESTDIR/ctl
uri=$(nbd_unix_uri "$psock")
start_server xnbd-server -r -u "$ssock" "$src"
start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$TESTDIR/cache.img" \
  --bitmap "$TESTDIR/cache.bitmap" --control "$ctlsock" -u "$psock"
wait_state "$ctlsock" proxying 30
ctl_ok "$ctlsock" cache-all
wait_state "$ctlsock" complete 60
s=$(ctl_ok "$ctlsock" status)
echo "complete: $s"
fetched=$(json_get "$s" bytes.fetched) zero=$(json_get "$s" bytes.zero_skipped)
[ "$zero" -gt 0 ] || fail "bytes.zero_skipped is $zero for a mostly sparse source"
[ "$fetched" -lt $((size / 2)) ] ||
  fail "fetched $fetched bytes of a $size-byte image with $data bytes of data (holes were transferred)"
[ "$fetched" -ge "$data" ] || fail "fetched $fetched bytes, fewer than the $data bytes of data"
[ $((fetched + zero)) -eq "$size" ] ||
  fail "fetched $fetched + zero-skipped $zero = $((fetched + zero)), expected exactly $size"

qemu-img compare -f raw -F raw "$src" "$uri" || fail "the proxy's disk differs from the source"
stop_ok "$PROXY_PID" xnbd-proxy
same_content "$TESTDIR/cache.img" "$src"
calloc=$(( $(stat -c %b "$TESTDIR/cache.img") * $(stat -c %B "$TESTDIR/cache.img") ))
echo "cache image: $calloc bytes allocated"
[ "$calloc" -lt $((size / 2)) ] || fail "the cache image has $calloc bytes allocated: holes were written as data"
[ "$(sha "$src")" = "$src_sha" ] || fail "the source image changed (I6)"
stop_ok "$SERVER_PID" xnbd-server

# Start over from src2: zeros over the old data, data elsewhere.
src2=$TESTDIR/src2.img
make_sparse_image "$src2" 64M
make_image "$TESTDIR/data2.img" 2M 7
dd if="$TESTDIR/data2.img" of="$src2" bs=1M seek=40 conv=notrunc status=none
dd if="$TESTDIR/data2.img" of="$src2" bs=4096 count=3 seek=$(((20 * M + 8192) / 4096)) \
   conv=notrunc status=none
rm -f "$TESTDIR/data2.img"
ssock2=$TESTDIR/src2.sock
start_server xnbd-server -r -u "$ssock2" "$src2"
start_proxy --target "$(nbd_unix_uri "$ssock2")" --cache "$TESTDIR/cache.img" \
  --bitmap "$TESTDIR/cache.bitmap" --control "$ctlsock" -u "$psock" --clear-bitmap
wait_state "$ctlsock" proxying 30
ctl_ok "$ctlsock" cache-all
wait_state "$ctlsock" complete 60
s=$(ctl_ok "$ctlsock" status)
echo "second source, complete: $s"
zero=$(json_get "$s" bytes.zero_skipped)
[ "$zero" -gt $((size / 2)) ] || fail "bytes.zero_skipped is $zero for a mostly sparse second source"
qemu-img compare -f raw -F raw "$src2" "$uri" ||
  fail "over the first source's data, the disk differs from the second source"
stop_ok "$PROXY_PID" xnbd-proxy
same_content "$TESTDIR/cache.img" "$src2"
echo OK
