#!/usr/bin/env bash
# The digest export of xnbd-server (NAME@xnbd-sha256): its bytes are the
# sha256sum of each 4 KiB block of NAME (holes, text, random data, a
# partial last block), read whole or in pieces that start and end inside
# a digest; a write through the server, and one behind its back (while no
# write comes through the server), shows in the next read; it is read-only, not listed, and absent with --no-digests.
source "$(dirname "$0")/functions.sh"
source "$XNBD_SRC/tests/digest-common.sh"
requires nbdcopy nbdinfo nbdsh qemu-io xxd sha256sum split cmp
# nbdsh runs "python3 -m nbd": Debian's python3 (python3-libnbd), even when
# another python3 comes first in PATH.
nbdsh () { /usr/bin/python3 -m nbd "$@"; }

img=$TESTDIR/disk.img
other=$TESTDIR/other.img
make_image "$img" 24M 3
printf 'a partial last block' >>"$img"           # 24 MiB + 20 bytes
make_image "$other" 4M 9
blocks=$(( (24 * 1048576 + 20 + 4095) / 4096 ))
# An old mtime, so that the write behind the server's back below changes it
# whatever the clock's granularity (the server notices such a change by the
# image's times: digest-sidecar.h).
touch -d '2001-01-01 00:00:00' "$img"

sock=$TESTDIR/sock
start_server xnbd-server -u "$sock" -e vm2="$other" "$img"
pid=$SERVER_PID

# Size, read-only.
info=$(nbdinfo "$(digest_uri "$sock")")
grep -q "export-size: $(( blocks * 32 ))\$" <<<"$info" ||
  fail "digest export size: $(grep export-size <<<"$info")"
grep -q "is_read_only: true" <<<"$info" || fail "digest export is not read-only"

# Whole export, several connections and requests in flight, vs sha256sum.
block_digests "$img" "$TESTDIR/want.bin"
nbdcopy -C 2 -R 8 --request-size=65536 "$(digest_uri "$sock")" "$TESTDIR/got.bin"
same_content "$TESTDIR/want.bin" "$TESTDIR/got.bin"
block_digests "$other" "$TESTDIR/want2.bin"
nbdcopy "$(digest_uri "$sock" vm2)" "$TESTDIR/got2.bin"
same_content "$TESTDIR/want2.bin" "$TESTDIR/got2.bin"

# Reads that start and end inside digests, one connection (nbdsh).
piece ()
{
  nbdsh -u "$(digest_uri "$sock")" \
    -c "import sys; sys.stdout.write(h.pread($2, $1).hex())"
}
expect_piece ()
{
  dd if="$TESTDIR/want.bin" iflag=skip_bytes,count_bytes skip="$1" count="$2" \
    status=none | xxd -p | tr -d '\n'
}
for p in "1000 77" "$(( blocks * 32 - 13 )) 13" "31 2" "4096 150000" "0 $(( blocks * 32 ))"; do
  # shellcheck disable=SC2086
  [ "$(piece $p)" = "$(expect_piece $p)" ] || fail "digest bytes at $p differ"
done

# A write behind the server's back (block 7, no write through the server
# since the image's times were last seen) changes that block's digest,
# although the digests are now kept in the sidecar; then a write through
# the server (block 100): read again after each.
printf 'behind the back' | dd of="$img" bs=1 seek=$(( 7 * 4096 )) conv=notrunc status=none
nbdcopy "$(digest_uri "$sock")" "$TESTDIR/got25.bin"
block_digests "$img" "$TESTDIR/want25.bin"
same_content "$TESTDIR/want25.bin" "$TESTDIR/got25.bin"
qio "$(nbd_unix_uri "$sock")" "write -P 0x5a $(( 100 * 4096 + 10 )) 17"
nbdcopy "$(digest_uri "$sock")" "$TESTDIR/got3.bin"
cmp -s "$TESTDIR/got.bin" "$TESTDIR/got3.bin" && fail "digests unchanged after writes"
block_digests "$img" "$TESTDIR/want3.bin"
same_content "$TESTDIR/want3.bin" "$TESTDIR/got3.bin"
# Only those two blocks' digests changed.
changed=$( (cmp -l "$TESTDIR/got.bin" "$TESTDIR/got3.bin" || true) | awk '{ print int(($1 - 1) / 32) }' | sort -un | tr '\n' ' ')
[ "$changed" = "7 100 " ] || fail "changed digests: $changed (want blocks 7 and 100)"

# Writes to the digest export are refused by the server (libnbd's own
# checks off, so the request reaches it).
st=0
out=$(nbdsh -u "$(digest_uri "$sock")" -c '
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 32, 0)
    print("write succeeded")
except nbd.Error as e:
    print("refused:", e.string, e.errno)
' 2>&1) || st=$?
grep -q "^refused:.*EPERM" <<<"$out" || fail "write to the digest export: $out (exit $st)"

# Not listed; the data exports are.
nbdinfo --list "$(nbd_unix_uri "$sock")" >"$TESTDIR/list.out"
grep -q 'export="vm2"' "$TESTDIR/list.out" || fail "vm2 not listed: $(cat "$TESTDIR/list.out")"
grep -q xnbd-sha256 "$TESTDIR/list.out" && fail "digest export listed: $(cat "$TESTDIR/list.out")"
assert_alive "$pid"
stop_ok "$pid" xnbd-server

# --no-digests: the data is served, the digest export is not.
start_server xnbd-server --no-digests -u "$sock" "$img"
nbdcopy "$(nbd_unix_uri "$sock")" "$TESTDIR/data.bin"
same_content "$img" "$TESTDIR/data.bin"
if nbdinfo "$(digest_uri "$sock")" >"$TESTDIR/nd.out" 2>&1; then
  fail "digest export served with --no-digests"
fi
grep -qi "not exist\|unknown\|export" "$TESTDIR/nd.out" || fail "unexpected error: $(cat "$TESTDIR/nd.out")"
stop_ok "$SERVER_PID" xnbd-server
echo OK
