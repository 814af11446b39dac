#!/usr/bin/env bash
# Deduplication (DESIGN section 5, I4): blocks that exist in a local seed,
# at any offset, are copied from it instead of crossing the link; each is
# re-read and checked against the source's SHA-256 before use, so a seed
# changed after it was indexed never yields wrong data.  The source image
# (32 MiB): 8 MiB of the seed's second half, 4 MiB new, 2 MiB of zeros
# written as data (block status says data; the digests say zero), a 2 MiB
# hole, 8 MiB of the seed's first half, 8 MiB new.
#   run 1: bytes.seeded = 16 MiB, bytes.fetched = 12 MiB, zero 4 MiB (the
#          written zeros are not fetched either); the disk equals the
#          source; the seed is unchanged (read-only).
#   run 2: the index file is reused (no hashing), then 1 MiB of the seed is
#          overwritten before the copy: those blocks are fetched instead,
#          and the disk still equals the source.
#   run 3: a source that publishes no digests (nbdkit): the seed is not
#          used, the copy completes, and the log says why.
#   run 4: the same source with --digests from xnbd-digest: the seed is
#          used; a digest file made for another image is refused.
#   run 5: a slow background copy (--bg-rate): once the digests are in, a
#          client's read of seeded blocks far ahead of the copy is served
#          from the seed, and one of the written zeros as zeros, with no
#          on-demand fetch.
#   run 6: the VM moves back: run 1's cache (a full older copy), a new
#          bitmap, and 1 MiB changed at the source since: only that MiB
#          crosses; the rest is kept from the cache after its digest check.
#   run 7: a 2 GiB source that is a hole but for 1 MiB at the start and 1 MiB
#          of the seed at 1900 MiB: block status lands the hole at once and
#          the copy's cursor jumps past digest chunks not asked yet (64 MiB
#          of image each, asked up to 16 chunks ahead of the cursor); they
#          must still be asked, or the copy waits for them forever.
source "$(dirname "$0")/functions.sh"
requires qemu-img nbdkit

M=$((1024 * 1024))
seed=$TESTDIR/seed.img src=$TESTDIR/src.img idx=$TESTDIR/seeds.index
head -c $((16 * M)) /dev/urandom >"$seed"
truncate -s $((32 * M)) "$src"
dd if="$seed" of="$src" bs=1M skip=8 seek=0 count=8 conv=notrunc status=none
head -c $((4 * M)) /dev/urandom | dd of="$src" bs=1M seek=8 conv=notrunc status=none
dd if=/dev/zero of="$src" bs=1M seek=12 count=2 conv=notrunc status=none
dd if="$seed" of="$src" bs=1M skip=0 seek=16 count=8 conv=notrunc status=none
head -c $((8 * M)) /dev/urandom | dd of="$src" bs=1M seek=24 conv=notrunc status=none
seed_sha=$(sha "$seed")

ssock=$TESTDIR/src.sock
start_server xnbd-server -r -u "$ssock" "$src"
src_pid=$SERVER_PID

run_proxy () {   # NAME [extra args]: starts a proxy over the xnbd-server source
  local n=$1; shift
  start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$TESTDIR/$n.cache" \
    --bitmap "$TESTDIR/$n.bitmap" --control "$TESTDIR/$n.ctl" -u "$TESTDIR/$n.sock" \
    --seed "$seed" "$@"
  wait_state "$TESTDIR/$n.ctl" proxying 30
}
finish () {      # NAME: cache-all, wait, compare, print status
  local n=$1
  ctl_ok "$TESTDIR/$n.ctl" cache-all >/dev/null
  wait_state "$TESTDIR/$n.ctl" complete 60
  qemu-img compare -q -f raw -F raw "$src" "$(nbd_unix_uri "$TESTDIR/$n.sock")" ||
    fail "$n: the proxy's disk differs from the source"
  ctl_ok "$TESTDIR/$n.ctl" status
}

# Run 1.
run_proxy r1 --index "$idx"
s=$(finish r1)
echo "run 1: $s"
[ "$(json_get "$s" dedup)" = true ] || fail "run 1: deduplication not in use: $s"
[ "$(json_get "$s" bytes.seeded)" -eq $((16 * M)) ] || fail "run 1: bytes.seeded is not 16 MiB: $s"
[ "$(json_get "$s" bytes.fetched)" -eq $((12 * M)) ] || fail "run 1: bytes.fetched is not 12 MiB: $s"
[ "$(json_get "$s" bytes.zero_skipped)" -eq $((4 * M)) ] || fail "run 1: zero_skipped is not 4 MiB: $s"
[ "$(json_get "$s" bytes.digests)" -eq $((32 * M / 4096 * 32)) ] || fail "run 1: digest bytes: $s"
stop_ok "$PROXY_PID" xnbd-proxy
[ "$(sha "$seed")" = "$seed_sha" ] || fail "the seed was modified by the proxy"
[ -s "$idx" ] || fail "no index file written at $idx"

# Run 2: index reused; the seed changes after indexing (I4).
run_proxy r2 --index "$idx"
grep -q "0 hashed now" "$PROXY_LOG" || fail "run 2: the index file was not reused: $(grep dedup "$PROXY_LOG")"
head -c $((1 * M)) /dev/urandom | dd of="$seed" bs=1M seek=0 conv=notrunc status=none
s=$(finish r2)
echo "run 2: $s"
seeded=$(json_get "$s" bytes.seeded) fetched=$(json_get "$s" bytes.fetched)
# The changed MiB is fetched (with at most the rest of a 1 MiB seed job).
[ $((seeded + fetched)) -eq $((28 * M)) ] || fail "run 2: seeded + fetched != 28 MiB: $s"
[ "$seeded" -ge $((14 * M)) ] && [ "$seeded" -le $((15 * M)) ] ||
  fail "run 2: bytes.seeded $seeded, expected 14-15 MiB (16 less the changed MiB): $s"
stop_ok "$PROXY_PID" xnbd-proxy

# Run 3: no digests at the source.
start_nbdkit -r -U "$TESTDIR/nbdkit.sock" file "$src"
start_proxy --target "$(nbd_unix_uri "$TESTDIR/nbdkit.sock")" --cache "$TESTDIR/r3.cache" \
  --bitmap "$TESTDIR/r3.bitmap" --control "$TESTDIR/r3.ctl" -u "$TESTDIR/r3.sock" --seed "$seed"
ctl_ok "$TESTDIR/r3.ctl" cache-all >/dev/null
wait_state "$TESTDIR/r3.ctl" complete 60
# (said when the digest export's open failed: maybe after clients were let in)
grep -q "publishes no block digests" "$PROXY_LOG" || fail "run 3: no word on the missing digests"
s=$(ctl_ok "$TESTDIR/r3.ctl" status)
[ "$(json_get "$s" bytes.seeded)" -eq 0 ] || fail "run 3: seeded without digests: $s"
qemu-img compare -q -f raw -F raw "$src" "$(nbd_unix_uri "$TESTDIR/r3.sock")" ||
  fail "run 3: the proxy's disk differs from the source"
stop_ok "$PROXY_PID" xnbd-proxy

# Run 4: digests from a file (the seed's changed first MiB as in run 2).
"$XNBD_BUILD/xnbd-digest" -q "$src" -o "$TESTDIR/src.digests"
"$XNBD_BUILD/xnbd-digest" -q "$seed" -o "$TESTDIR/other.digests"
r4=(--target "$(nbd_unix_uri "$TESTDIR/nbdkit.sock")" --cache "$TESTDIR/r4.cache"
    --bitmap "$TESTDIR/r4.bitmap" --control "$TESTDIR/r4.ctl" -u "$TESTDIR/r4.sock" --seed "$seed")
st=0
"$XNBD_BUILD/xnbd-proxy" "${r4[@]}" --digests "$TESTDIR/other.digests" 2>"$TESTDIR/r4.err" || st=$?
[ "$st" -ne 0 ] || fail "run 4: a digest file of another image was accepted"
echo "refused: $(tail -1 "$TESTDIR/r4.err")"
[ ! -e "$TESTDIR/r4.bitmap" ] && [ ! -e "$TESTDIR/r4.cache" ] ||
  fail "run 4: the refused start left a cache or bitmap behind"
start_proxy "${r4[@]}" --digests "$TESTDIR/src.digests"
ctl_ok "$TESTDIR/r4.ctl" cache-all >/dev/null
wait_state "$TESTDIR/r4.ctl" complete 60
s=$(ctl_ok "$TESTDIR/r4.ctl" status)
echo "run 4: $s"
seeded=$(json_get "$s" bytes.seeded)
[ "$seeded" -ge $((14 * M)) ] || fail "run 4: bytes.seeded $seeded with a digest file: $s"
qemu-img compare -q -f raw -F raw "$src" "$(nbd_unix_uri "$TESTDIR/r4.sock")" ||
  fail "run 4: the proxy's disk differs from the source"
stop_ok "$PROXY_PID" xnbd-proxy

# Run 5: a miss served from a seed (the seed was restored to its first state
# for blocks 256.. only: read the source's 17-18 MiB = seed MiB 1).
run_proxy r5 --bg-rate 64K
ctl_ok "$TESTDIR/r5.ctl" cache-all >/dev/null
wait_status "$TESTDIR/r5.ctl" 30 'j["bytes"]["digests"] == 32 * 1048576 // 4096 * 32'
before=$(proxy_status "$TESTDIR/r5.ctl" fetches.ondemand)
hexdump_of () {   # FILE-OR-URI OFF LEN: the bytes as qemu-io prints them
  qemu-io -f raw -r -c "read -v $2 $3" "$1" | grep -v '^read\|ops/sec'
}
[ "$(hexdump_of "$(nbd_unix_uri "$TESTDIR/r5.sock")" $((17 * M)) 1M)" = \
  "$(hexdump_of "$src" $((17 * M)) 1M)" ] ||
  fail "run 5: the read served from the seed differs from the source"
[ "$(hexdump_of "$(nbd_unix_uri "$TESTDIR/r5.sock")" $((12 * M)) 1M)" = \
  "$(hexdump_of "$src" $((12 * M)) 1M)" ] ||
  fail "run 5: the read of written zeros differs from the source"
s=$(ctl_ok "$TESTDIR/r5.ctl" status)
echo "run 5: $s"
[ "$(json_get "$s" fetches.ondemand)" -eq "$before" ] ||
  fail "run 5: the read of seeded blocks or written zeros went to the source: $s"
[ "$(json_get "$s" bytes.seeded)" -ge $((1 * M)) ] || fail "run 5: nothing seeded: $s"
stop_ok "$PROXY_PID" xnbd-proxy

# Run 6: an older copy in the cache, used at the same offset (no --seed).
head -c $((1 * M)) /dev/urandom | dd of="$src" bs=1M seek=26 conv=notrunc status=none
start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$TESTDIR/r1.cache" \
  --bitmap "$TESTDIR/r1.bitmap" --control "$TESTDIR/r6.ctl" -u "$TESTDIR/r6.sock" --clear-bitmap
grep -q "holds .* blocks of older data" "$PROXY_LOG" || fail "run 6: the older copy was not noticed"
ctl_ok "$TESTDIR/r6.ctl" cache-all >/dev/null
wait_state "$TESTDIR/r6.ctl" complete 60
qemu-img compare -q -f raw -F raw "$src" "$(nbd_unix_uri "$TESTDIR/r6.sock")" ||
  fail "run 6: the proxy's disk differs from the source"
s=$(ctl_ok "$TESTDIR/r6.ctl" status)
echo "run 6: $s"
fetched=$(json_get "$s" bytes.fetched) seeded=$(json_get "$s" bytes.seeded)
[ "$fetched" -le $((2 * M)) ] && [ "$fetched" -ge $((1 * M)) ] ||
  fail "run 6: fetched $fetched bytes, expected the changed MiB (at most 2 MiB): $s"
[ "$seeded" -ge $((26 * M)) ] || fail "run 6: only $seeded bytes kept from the older copy: $s"
stop_ok "$PROXY_PID" xnbd-proxy

# Run 7.
src7=$TESTDIR/src7.img
truncate -s $((2048 * M)) "$src7"
head -c $((1 * M)) /dev/urandom | dd of="$src7" bs=1M conv=notrunc status=none
dd if="$seed" of="$src7" bs=1M skip=4 seek=1900 count=1 conv=notrunc status=none
start_server xnbd-server -r -u "$TESTDIR/src7.sock" "$src7"
start_proxy --target "$(nbd_unix_uri "$TESTDIR/src7.sock")" --cache "$TESTDIR/r7.cache" \
  --bitmap "$TESTDIR/r7.bitmap" --control "$TESTDIR/r7.ctl" -u "$TESTDIR/r7.sock" \
  --seed "$seed" --index "$idx" --cache-all
wait_state "$TESTDIR/r7.ctl" complete 60
s=$(ctl_ok "$TESTDIR/r7.ctl" status)
echo "run 7: $s"
[ "$(json_get "$s" bytes.seeded)" -eq $((1 * M)) ] || fail "run 7: the seeded MiB was not seeded: $s"
[ "$(json_get "$s" bytes.fetched)" -eq $((1 * M)) ] || fail "run 7: bytes.fetched is not 1 MiB: $s"
qemu-img compare -q -f raw -F raw "$src7" "$(nbd_unix_uri "$TESTDIR/r7.sock")" ||
  fail "run 7: the proxy's disk differs from the source"
echo OK
