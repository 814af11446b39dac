#!/usr/bin/env bash
# Background jobs read across short runs of known-zero blocks when the
# source link is xnbd:// with zstd (zeros compress to nothing there), so a
# shuffled image is copied in a few large requests instead of one request
# per data run -- and the bridged blocks, already present, are never
# written again (I1, I3).
#
# Source: 16 MiB, blocks 3k and 3k+1 random data, block 3k+2 a hole (1366
# data runs).  The copy starts capped at 64 KiB/s (one first job, then a
# long wait for tokens); block status marks every hole present at once.
# Meanwhile a client writes three whole zero blocks and 512 bytes of a
# fourth, far ahead of the copy.  Then the cap is lifted.  Expected:
# complete, the export equals the source with those writes, few background
# fetches, bytes.bridged > 0, fetched + zero-skipped = the image size (no
# block counted twice), bytes.local_written = the writes, and the cache
# image has no more blocks allocated than data + writes (bridged zeros were
# not written).  The same copy over plain NBD must not bridge: one fetch
# per data run, bytes.bridged 0.
source "$(dirname "$0")/functions.sh"
requires qemu-io nbdcopy cmp

BS=4096 NB=4096 size=$((4096 * 4096))
src=$TESTDIR/src.img model=$TESTDIR/model.img
python3 - "$src" "$NB" <<'PY'
import os, random, sys
path, nb = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
with open(path, "wb") as f:
    f.truncate(nb * 4096)
    for b in range(nb):
        if b % 3 != 2:
            f.seek(b * 4096)
            f.write(rng.randbytes(4096))
PY
runs=$(( (NB + 2) / 3 ))                       # data runs: blocks 3k, 3k+1
data=$(( (NB - NB / 3) * BS ))                  # bytes in data blocks
alloc=$(( $(stat -c %b "$src") * $(stat -c %B "$src") ))
[ "$alloc" -lt $((size * 3 / 4)) ] || skip "the filesystem of $TESTDIR does not keep files sparse"
src_sha=$(sha "$src")

start_server xnbd-server -r -u "$TESTDIR/src.sock" -W 127.0.0.1:0 \
  --wan-port-file "$TESTDIR/wan.port" "$src"
wait_for test -s "$TESTDIR/wan.port"
wan_uri="xnbd://127.0.0.1:$(cat "$TESTDIR/wan.port")/"

# --------------------------------------------------------------- xnbd://
ctl=$TESTDIR/ctl psock=$TESTDIR/proxy.sock
start_proxy --target "$wan_uri" --cache "$TESTDIR/cache.img" --bitmap "$TESTDIR/cache.bm" \
  --control "$ctl" -u "$psock" --bg-rate 64K
wait_state "$ctl" proxying 30
ctl_ok "$ctl" cache-all >/dev/null
# Every hole is known (and present) once block status has answered.
zero_bytes=$(( (NB / 3) * BS ))
wait_status "$ctl" 30 "j['bytes']['zero_skipped'] == $zero_bytes"

# Writes far ahead of the capped copy, into blocks already present as zero.
cp "$src" "$model"
puri=$(nbd_unix_uri "$psock")
for b in 3902 3998 4094; do
  [ $((b % 3)) -eq 2 ] || fail "test bug: block $b is not a hole"
  qio "$puri" "write -P 0x5a $((b * BS)) $BS"
  qemu-io -f raw -c "write -P 0x5a $((b * BS)) $BS" "$model" >/dev/null
done
qio "$puri" "write -P 0x77 $((3500 * BS + 1024)) 512"
qemu-io -f raw -c "write -P 0x77 $((3500 * BS + 1024)) 512" "$model" >/dev/null
s=$(ctl_ok "$ctl" status)
[ "$(json_get "$s" fetches.ondemand)" -eq 0 ] ||
  fail "writes into zero-known blocks fetched from the source: $s"

ctl_ok "$ctl" "rate 0" >/dev/null
wait_state "$ctl" complete 60
s=$(ctl_ok "$ctl" status)
echo "xnbd:// complete: $s"
fetched=$(json_get "$s" bytes.fetched) zero=$(json_get "$s" bytes.zero_skipped)
bridged=$(json_get "$s" bytes.bridged) bg=$(json_get "$s" fetches.background)
[ "$bridged" -gt 0 ] || fail "bytes.bridged is 0: no background job read across a zero gap"
[ "$bg" -lt $((runs / 4)) ] ||
  fail "$bg background fetches for $runs data runs: jobs were not joined across zero gaps"
[ $((fetched + zero)) -eq "$size" ] ||
  fail "fetched $fetched + zero-skipped $zero = $((fetched + zero)), expected exactly $size"
[ "$(json_get "$s" bytes.local_written)" -eq $((3 * BS + 512)) ] ||
  fail "bytes.local_written is $(json_get "$s" bytes.local_written), expected $((3 * BS + 512))"
nbdcopy "$puri" "$TESTDIR/out.img"
same_content "$TESTDIR/out.img" "$model"
stop_ok "$PROXY_PID" xnbd-proxy
same_content "$TESTDIR/cache.img" "$model"
calloc=$(( $(stat -c %b "$TESTDIR/cache.img") * $(stat -c %B "$TESTDIR/cache.img") ))
echo "cache image: $calloc bytes allocated; data $data bytes"
[ "$calloc" -le $((data + 4 * BS + 256 * 1024)) ] ||
  fail "the cache image has $calloc bytes allocated for $data bytes of data: bridged zeros were written"

# --------------------------------------------------------------- nbd://
ctl2=$TESTDIR/ctl2
start_proxy --target "$(nbd_unix_uri "$TESTDIR/src.sock")" --cache "$TESTDIR/cache2.img" \
  --bitmap "$TESTDIR/cache2.bm" --control "$ctl2" -u "$TESTDIR/proxy2.sock" --cache-all
wait_state "$ctl2" complete 60
s=$(ctl_ok "$ctl2" status)
echo "nbd:// complete: $s"
[ "$(json_get "$s" bytes.bridged)" -eq 0 ] || fail "bridged zeros over plain NBD: $s"
[ "$(json_get "$s" fetches.background)" -ge "$runs" ] ||
  fail "$(json_get "$s" fetches.background) background fetches over plain NBD for $runs data runs"
[ $(( $(json_get "$s" bytes.fetched) + $(json_get "$s" bytes.zero_skipped) )) -eq "$size" ] ||
  fail "plain NBD: fetched + zero-skipped is not the image size: $s"
stop_ok "$PROXY_PID" xnbd-proxy
same_content "$TESTDIR/cache2.img" "$src"
[ "$(sha "$src")" = "$src_sha" ] || fail "the source image changed (I6)"
echo OK
