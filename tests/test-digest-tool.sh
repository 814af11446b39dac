#!/usr/bin/env bash
# xnbd-digest IMAGE -o FILE: the digests after the header equal sha256sum
# of each block and the bytes of xnbd-server's digest export; the header's
# sampled identity is the one xnbd-proxy records for an nbdkit source of
# the image; the reader (digest-check: digest_file_open) returns them for
# the right image and refuses, with a clear message, a file for another
# size or other sampled blocks, a damaged, truncated or foreign file; the
# tool's own errors.
source "$(dirname "$0")/functions.sh"
source "$XNBD_SRC/tests/digest-common.sh"
requires nbdcopy nbdkit xxd sha256sum split cmp
check=$XNBD_BUILD/tests/digest-check
digest=$XNBD_BUILD/xnbd-digest
[ -x "$check" ] || fail "$check not built (run make)"

img=$TESTDIR/disk.img
make_image "$img" 20M 4
printf 'tail' >>"$img"
size=$(stat -c %s "$img")
out=$TESTDIR/disk.dgst

"$digest" "$img" -o "$out" >"$TESTDIR/tool.out"
grep -q "size=$size sample=[0-9a-f]\{64\})\$" "$TESTDIR/tool.out" ||
  fail "xnbd-digest printed: $(cat "$TESTDIR/tool.out")"
[ ! -e "$out.tmp" ] || fail "xnbd-digest left $out.tmp behind"
head -c 8 "$out" | grep -q '^XNBDDGST$' || fail "no XNBDDGST magic"
tail -c +129 "$out" >"$TESTDIR/array.bin"
block_digests "$img" "$TESTDIR/want.bin"
same_content "$TESTDIR/want.bin" "$TESTDIR/array.bin"
# Single-threaded: the same file.
"$digest" -q -t 1 "$img" -o "$TESTDIR/t1.dgst"
same_content "$out" "$TESTDIR/t1.dgst"

# The same bytes as xnbd-server's digest export.
sock=$TESTDIR/sock
start_server xnbd-server -r --image-id=off -u "$sock" "$img"
nbdcopy "$(digest_uri "$sock")" "$TESTDIR/export.bin"
same_content "$TESTDIR/export.bin" "$TESTDIR/array.bin"
stop_ok "$SERVER_PID" xnbd-server

# The header's sample is the identity xnbd-proxy records for nbdkit
# serving the image.
sample=$(head -c 88 "$out" | tail -c 64)
ssock=$TESTDIR/src.sock
start_nbdkit -r -U "$ssock" file file="$img"
nbd_src=$SERVER_PID
ctl=$TESTDIR/ctl.sock
start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$TESTDIR/cache.img" \
  --bitmap "$TESTDIR/bitmap" --control "$ctl" -u "$TESTDIR/proxy.sock"
wait_state "$ctl" proxying 30
recorded=$(proxy_status "$ctl" source_id)
[ "$recorded" = "export= size=$size sample=$sample" ] ||
  fail "the proxy recorded '$recorded', the digest file has size=$size sample=$sample"
stop_ok "$PROXY_PID" xnbd-proxy
stop_ok "$nbd_src" nbdkit

# The reader: all, and a range.
"$check" "$out" "$size" "$sample" >"$TESTDIR/read.bin"
same_content "$TESTDIR/want.bin" "$TESTDIR/read.bin"
"$check" "$out" "$size" "$sample" 100 7 >"$TESTDIR/range.bin"
dd if="$TESTDIR/want.bin" of="$TESTDIR/want-range.bin" bs=32 skip=100 count=7 status=none
same_content "$TESTDIR/want-range.bin" "$TESTDIR/range.bin"
blocks=$(( (size + 4095) / 4096 ))
st=0; "$check" "$out" "$size" "$sample" $(( blocks - 1 )) 2 >/dev/null 2>&1 || st=$?
[ "$st" -eq 1 ] || fail "a range past the last block was read (status $st)"

# refused WHY REGEX FILE SIZE SAMPLE: the reader refuses, saying REGEX.
refused ()
{
  local why=$1 re=$2 st=0 msg
  msg=$("$check" "$3" "$4" "$5" 2>&1 >/dev/null) || st=$?
  [ "$st" -eq 1 ] || fail "$why: accepted (status $st)"
  grep -qiE "$re" <<<"$msg" || fail "$why: unexpected message: $msg"
  grep -q "xnbd-digest" <<<"$msg" || grep -qi "give the file" <<<"$msg" ||
    fail "$why: the message does not say what to do: $msg"
}
refused "another size" "made for an image of $size bytes, but the source has $(( size + 4096 ))" \
  "$out" $(( size + 4096 )) "$sample"
other=$(printf '%064d' 0)
refused "other sampled blocks" "sampled blocks differ" "$out" "$size" "$other"

# Another image of the same size (one sampled block differs).
cp "$img" "$TESTDIR/img2"
printf 'X' | dd of="$TESTDIR/img2" bs=1 seek=0 conv=notrunc status=none
"$digest" -q "$TESTDIR/img2" -o "$TESTDIR/img2.dgst"
refused "a file for another image" "sampled blocks differ" "$TESTDIR/img2.dgst" "$size" "$sample"

# Damaged: one digest byte flipped; truncated; not a digest file; another version.
cp "$out" "$TESTDIR/bad.dgst"
printf '\xff' | dd of="$TESTDIR/bad.dgst" bs=1 seek=$(( 128 + 32 * 77 + 5 )) conv=notrunc status=none
cmp -s "$out" "$TESTDIR/bad.dgst" && printf '\x00' |
  dd of="$TESTDIR/bad.dgst" bs=1 seek=$(( 128 + 32 * 77 + 5 )) conv=notrunc status=none
refused "a flipped digest byte" "damaged" "$TESTDIR/bad.dgst" "$size" "$sample"
head -c $(( 128 + 32 * 10 )) "$out" >"$TESTDIR/short.dgst"
refused "a truncated file" "truncated" "$TESTDIR/short.dgst" "$size" "$sample"
head -c 100 "$out" >"$TESTDIR/tiny.dgst"
refused "a file shorter than a header" "too short" "$TESTDIR/tiny.dgst" "$size" "$sample"
refused "an image, not a digest file" "not an xnbd digest file" "$img" "$size" "$sample"
cp "$out" "$TESTDIR/v2.dgst"
printf '\x00\x00\x00\x02' | dd of="$TESTDIR/v2.dgst" bs=1 seek=8 conv=notrunc status=none
refused "another format version" "version 2" "$TESTDIR/v2.dgst" "$size" "$sample"

# The tool's errors: no such image, no -o, an unwritable output; nothing
# left behind.
st=0; msg=$("$digest" "$TESTDIR/nope.img" -o "$TESTDIR/x.dgst" 2>&1) || st=$?
[ "$st" -eq 1 ] && grep -q "cannot open image.*nope.img.*No such file" <<<"$msg" ||
  fail "missing image: status $st: $msg"
st=0; msg=$("$digest" "$img" 2>&1) || st=$?
[ "$st" -eq 1 ] && grep -q -- "-o FILE" <<<"$msg" || fail "no -o: status $st: $msg"
st=0; msg=$("$digest" "$img" -o "$TESTDIR/no/such/dir/x.dgst" 2>&1) || st=$?
[ "$st" -eq 1 ] && grep -q "cannot create" <<<"$msg" || fail "bad output: status $st: $msg"
[ ! -e "$TESTDIR/x.dgst" ] || fail "a digest file was written for a missing image"
echo OK
