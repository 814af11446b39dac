#!/usr/bin/env bash
# Seeds that change under the proxy after they were indexed, before the
# copy reaches their blocks (DESIGN I4: the index is a hint, every block
# taken from a seed is re-read and re-hashed first).
#
# Three 8 MiB seeds of random data; the 32 MiB source holds, MiB by MiB:
#   0-4 A's first half   4-5 new   5-9 A's second half   9-10 new
#   10-18 seed B         18-19 new 19-27 seed C          27-28 new   28-32 hole
# The proxy indexes the seeds and waits (no copy yet).  Then:
#   A is truncated to half (its second half is gone);
#   B is replaced: another file is moved over its name, and its old inode
#     (still open in the proxy, reachable here through a hard link) has
#     MiB 2-3 overwritten;
#   C is deleted, and its old inode's MiB 5-6 overwritten the same way.
# After cache-all: the disk equals the source; exactly the blocks still
# verified are counted as seeded (A's first half, B and C less one MiB
# each: 18 MiB), the rest fetched (10 MiB), the hole skipped; the proxy
# stays up and exits cleanly, and its log (-v) says why blocks came from the
# source instead, as many times as its status counts (fetches.seed_stale).  The seeds' remaining content is not written by the proxy.
source "$(dirname "$0")/functions.sh"
requires qemu-img

M=$((1024 * 1024))
A=$TESTDIR/a.img B=$TESTDIR/b.img C=$TESTDIR/c.img src=$TESTDIR/src.img
for f in "$A" "$B" "$C"; do head -c $((8 * M)) /dev/urandom >"$f"; done
truncate -s $((32 * M)) "$src"
put () {   # FILE SKIP_MIB SEEK_MIB COUNT_MIB: copy into the source
  dd if="$1" of="$src" bs=1M skip="$2" seek="$3" count="$4" iflag=fullblock conv=notrunc status=none
}
put "$A" 0 0 4
put /dev/urandom 0 4 1
put "$A" 4 5 4
put /dev/urandom 0 9 1
put "$B" 0 10 8
put /dev/urandom 0 18 1
put "$C" 0 19 8
put /dev/urandom 0 27 1
src_sha=$(sha "$src")

start_server xnbd-server -r -u "$TESTDIR/src.sock" "$src"
ctl=$TESTDIR/ctl
start_proxy --target "$(nbd_unix_uri "$TESTDIR/src.sock")" --cache "$TESTDIR/cache" \
  --bitmap "$TESTDIR/bm" --control "$ctl" -u "$TESTDIR/px.sock" \
  --seed "$A" --seed "$B" --seed "$C" -v
puri=$(nbd_unix_uri "$TESTDIR/px.sock")
wait_state "$ctl" proxying 30
grep -q "deduplication: 3 seeds, 6144 blocks indexed" "$PROXY_LOG" ||
  fail "the seeds were not indexed as expected: $(grep -i dedup "$PROXY_LOG")"
[ "$(proxy_status "$ctl" bytes.digests)" -eq 0 ] || fail "digests read before the copy"

# The seeds change.
truncate -s $((4 * M)) "$A"
ln "$B" "$TESTDIR/b.old"
head -c $((8 * M)) /dev/urandom >"$TESTDIR/b.new"
b_new_sha=$(sha "$TESTDIR/b.new")
mv "$TESTDIR/b.new" "$B"
head -c $((1 * M)) /dev/urandom |
  dd of="$TESTDIR/b.old" bs=1M seek=2 conv=notrunc status=none
ln "$C" "$TESTDIR/c.old"
rm "$C"
head -c $((1 * M)) /dev/urandom |
  dd of="$TESTDIR/c.old" bs=1M seek=5 conv=notrunc status=none
a_sha=$(sha "$A") b_old_sha=$(sha "$TESTDIR/b.old") c_old_sha=$(sha "$TESTDIR/c.old")

ctl_ok "$ctl" cache-all >/dev/null
wait_state "$ctl" complete 60
s=$(ctl_ok "$ctl" status)
echo "status: $s"
qemu-img compare -q -f raw -F raw "$src" "$puri" ||
  fail "the proxy's disk differs from the source"
seeded=$(json_get "$s" bytes.seeded) fetched=$(json_get "$s" bytes.fetched)
[ "$seeded" -eq $((18 * M)) ] ||
  fail "bytes.seeded is $seeded, expected the 18 MiB still verified: $s"
[ "$fetched" -eq $((10 * M)) ] || fail "bytes.fetched is $fetched, expected 10 MiB: $s"
[ "$(json_get "$s" bytes.zero_skipped)" -eq $((4 * M)) ] || fail "zero_skipped: $s"
[ "$(json_get "$s" fetches.errors)" -eq 0 ] || fail "fetch errors: $s"
n=$(grep -c "its seed no longer holds the source's data" "$PROXY_LOG" || true)
echo "log: $n lines on blocks fetched instead of seeded, e.g.:"
grep -m2 "its seed no longer holds" "$PROXY_LOG" || true
[ "$n" -ge 6 ] || fail "the log does not say why blocks were fetched instead (expected at least 6 jobs: 4 of A, 1 of B, 1 of C)"
stale=$(json_get "$s" fetches.seed_stale)
[ "$stale" -eq "$n" ] ||
  fail "fetches.seed_stale is $stale, the log names $n seed jobs fetched instead: $s"
plain=$("$XNBD_BUILD/xnbd-ctl" -c "$ctl" status) || fail "xnbd-ctl status failed"
grep -q "^from seeds: .*; $stale runs fetched instead: the seed had changed)" <<<"$plain" ||
  fail "xnbd-ctl status does not say that $stale runs were fetched instead: $plain"
assert_alive "$PROXY_PID"
stop_ok "$PROXY_PID" xnbd-proxy
[ "$(sha "$src")" = "$src_sha" ] || fail "the source image changed"
[ "$(sha "$A")" = "$a_sha" ] && [ "$(sha "$TESTDIR/b.old")" = "$b_old_sha" ] &&
  [ "$(sha "$TESTDIR/c.old")" = "$c_old_sha" ] && [ "$(sha "$B")" = "$b_new_sha" ] ||
  fail "a seed was modified by the proxy"
echo OK
