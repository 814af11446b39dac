#!/usr/bin/env bash
# Deduplication and --standby (the digest rule, man xnbd-proxy(8)
# "Deduplication"): while the VM may still write at the source, the proxy
# reads no digest, so no digest can go stale before it is used.
#
# The seed is a copy of the source image as it was at the start (16 MiB of
# random data, so every block is a seed hit).  In standby, client reads
# pass through and bytes.digests stays 0.  Then the VM at the source writes
# through the (writable) xnbd-server: a 1 MiB run, a 4 KiB block, a 512-byte
# piece of a block, a block straddling write.  Their old content is still
# in the seed with the old digests, so a digest read before those writes
# would install the old content from the seed (and pass the re-hash, which
# compares with that old digest).  After `activate` and cache-all the
# digests are read and used: bytes.digests covers the disk, bytes.seeded is
# every block except the changed ones (fetched), and the disk equals the
# source's final content.  The seed is unchanged.
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img

M=$((1024 * 1024))
src=$TESTDIR/src.img seed=$TESTDIR/seed.img
head -c $((16 * M)) /dev/urandom >"$src"
cp "$src" "$seed"
seed_sha=$(sha "$seed")

start_server xnbd-server -u "$TESTDIR/src.sock" "$src"      # writable: the VM at A
suri=$(nbd_unix_uri "$TESTDIR/src.sock")
ctl=$TESTDIR/ctl
start_proxy --target "$suri" --cache "$TESTDIR/cache" --bitmap "$TESTDIR/bm" \
  --control "$ctl" -u "$TESTDIR/px.sock" --seed "$seed" --standby --cache-all -v
puri=$(nbd_unix_uri "$TESTDIR/px.sock")
wait_state "$ctl" proxying 30
s=$(ctl_ok "$ctl" status)
[ "$(json_get "$s" standby)" = true ] || fail "not in standby: $s"
[ "$(json_get "$s" dedup)" = true ] || fail "deduplication not in use: $s"

# Standby reads (QEMU probing the disk at B) pass through; no digests.
qio "$puri" "read 0 1M" "read 5M 64k" "read 9M 4k" "read 15M 1M"
s=$(ctl_ok "$ctl" status)
echo "standby, after reads: $s"
[ "$(json_get "$s" bytes.digests)" -eq 0 ] || fail "digests read in standby: $s"
[ "$(json_get "$s" bytes.seeded)" -eq 0 ] || fail "seeded in standby: $s"
[ "$(json_get "$s" blocks.present)" -eq 0 ] || fail "standby reads kept blocks: $s"

# The VM at A writes (blocks whose old content the seed holds).
qio "$suri" "write -P 0x5a 2M 1M" "write -P 0xa5 5M 4k" "write -P 0x3c $((9 * M + 1024)) 512" \
  "write -P 0xc3 $((12 * M - 2048)) 4k"
changed=$(( 256 + 1 + 1 + 2 ))       # blocks touched by those writes
# A read at B sees them (pass-through), still no digests.
qio "$puri" "read -P 0x5a 2M 1M" "read -P 0x3c $((9 * M + 1024)) 512"
s=$(ctl_ok "$ctl" status)
[ "$(json_get "$s" bytes.digests)" -eq 0 ] || fail "digests read in standby: $s"
fetched0=$(json_get "$s" bytes.fetched)

# Switch-over: the VM is stopped at A; --cache-all starts the copy now.
ctl_ok "$ctl" activate >/dev/null
wait_state "$ctl" complete 60
s=$(ctl_ok "$ctl" status)
echo "after activate: $s"
[ "$(json_get "$s" standby)" = false ] || fail "still in standby after activate: $s"
qemu-img compare -q -f raw -F raw "$src" "$puri" ||
  fail "the migrated disk differs from the source's final content"
[ "$(json_get "$s" bytes.digests)" -eq $((16 * M / 4096 * 32)) ] ||
  fail "the digests were not read once after activation: $s"
[ "$(json_get "$s" bytes.seeded)" -eq $((16 * M - changed * 4096)) ] ||
  fail "bytes.seeded is not every unchanged block ($((16 * M - changed * 4096))): $s"
[ $(( $(json_get "$s" bytes.fetched) - fetched0 )) -eq $((changed * 4096)) ] ||
  fail "the copy fetched other than the $changed changed blocks: $s"
stop_ok "$PROXY_PID" xnbd-proxy
[ "$(sha "$seed")" = "$seed_sha" ] || fail "the seed was modified"
echo OK
