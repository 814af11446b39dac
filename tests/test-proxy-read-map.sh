#!/usr/bin/env bash
# The source's read map: xnbd-server notes which 1 MiB regions its clients
# (the VM at the source) read, most recent first, in NAME@xnbd-reads; a
# proxy's own reads (it marks itself a copier) are not noted.  xnbd-proxy
# reads the map once its copy may start -- after 'activate' in --standby --
# and copies those regions first.
#
# 1. A client reads regions 40, 52, 20 (in that order): the map ranks them
#    20, 52, 40 and names no other region.
# 2. A proxy copies slowly (--bg-rate 2M from offset 0): once status says
#    the map's 3 regions are done, the source is stopped; the 3 regions read
#    right from the cache alone, a far region fails with EIO (never
#    fetched).  The map still names 3 regions: the proxy's reads (its
#    sweep, the map itself) are not noted.  Twice: with 4 KiB blocks, and
#    with 4 MiB blocks (larger than a region).
# 3. A --standby proxy: a client reads region 10 at the source after the
#    proxy started; 'activate' then reads the map (the restarted server's:
#    region 10 alone) and the proxy copies it first.
# 4. xnbd-server --no-read-map serves no map; the proxy logs that and
#    copies in ascending order.
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img nbdcopy cmp python3

M=$((1024 * 1024))
src=$TESTDIR/src.img
head -c $((64 * M)) /dev/urandom >"$src"       # data everywhere: no zero skipped
ssock=$TESTDIR/src.sock
suri=$(nbd_unix_uri "$ssock")
start_server xnbd-server -u "$ssock" "$src"
src_pid=$SERVER_PID

# The map as "region:value" words, non-zero entries only, most recent first.
read_map ()
{
  nbdcopy "nbd+unix:///@xnbd-reads?socket=$ssock" - | python3 -c '
import struct, sys
b = sys.stdin.buffer.read()
assert b[:8] == b"XNBDREAD", "bad magic %r" % b[:8]
shift, zero = struct.unpack(">II", b[8:16])
assert shift == 20 and zero == 0, (shift, zero)
n = (len(b) - 16) // 4
assert len(b) == 16 + 4 * 64, "map of %d bytes for a 64 MiB image" % len(b)
v = struct.unpack(">%dI" % n, b[16:])
print(" ".join("%d" % r for r in sorted((r for r in range(n) if v[r]), key=lambda r: v[r])))'
}

# The VM at the source: reads in regions 40 and 52, then 20.
client_reads ()
{
  qio "$suri" "read $((40 * M + 8192)) 4096" "read $((52 * M)) 4096" >/dev/null
  qio "$suri" "read $((20 * M + 65536)) 65536" >/dev/null
}

# copy_first BS TAG: a slow proxy with cache blocks of BS bytes copies the
# map's 3 regions first; then, the source stopped, they read right from the
# cache and a far region fails with EIO.
copy_first ()
{
  local bs=$1 tag=$2 status present map out puri p1
  start_proxy --target "$suri" --cache "$TESTDIR/cache$tag.img" --block-size "$bs" \
    --bitmap "$TESTDIR/cache$tag.bitmap" --control "$TESTDIR/ctl$tag" -u "$TESTDIR/p$tag.sock" \
    --bg-rate 2M --bg-window 16M --source-timeout 2
  p1=$PROXY_PID
  wait_state "$TESTDIR/ctl$tag" proxying 30
  ctl_ok "$TESTDIR/ctl$tag" cache-all >/dev/null
  wait_status "$TESTDIR/ctl$tag" 60 'j["background"]["recent_regions"] == 3 and j["background"]["recent_done"] == 3'
  status=$(ctl_ok "$TESTDIR/ctl$tag" status)
  echo "block size $bs, after the read map's regions: $status"
  (( $(json_get "$status" fetches.recent) >= 3 )) || fail "no fetch counted as from the read map"
  present=$(json_get "$status" blocks.present)
  (( present * bs < 32 * M )) || fail "the sweep copied $present blocks already: too fast to tell"
  map=$(read_map) || fail "reading the map failed"
  [ "$map" = "20 52 40" ] || fail "the proxy's reads reached the map: '$map'"

  stop_ok "$src_pid" xnbd-server
  puri=$(nbd_unix_uri "$TESTDIR/p$tag.sock")
  for r in 20 52 40; do
    dd if="$src" of="$TESTDIR/want.bin" bs=$M skip=$r count=1 status=none
    # (qemu-img dd counts skipped blocks in count)
    timeout 30 qemu-img dd -f raw -O raw if="$puri" of="$TESTDIR/got.bin" bs=$M \
      skip=$r count=$((r + 1)) >"$TESTDIR/dd.out" 2>&1 ||
      { cat "$TESTDIR/dd.out"; fail "block size $bs: region $r does not read without the source: not copied first"; }
    cmp "$TESTDIR/got.bin" "$TESTDIR/want.bin" || fail "region $r differs from the source"
  done
  out=$(timeout 30 qemu-io -f raw -c "read $((60 * M)) 4096" "$puri" 2>&1) || true
  grep -qi 'Input/output error' <<<"$out" || fail "a region never fetched read without the source: $out"
  assert_alive "$p1"
  stop_ok "$p1" xnbd-proxy
}

# 1. The client's reads, ranked.
client_reads
map=$(read_map) || fail "reading the map failed"
[ "$map" = "20 52 40" ] || fail "map ranks '$map', expected '20 52 40'"

# 2. A proxy copies those regions first; again with blocks larger than the
#    map's regions (4 MiB: each region is part of one block).
copy_first 4096 a
start_server xnbd-server -u "$ssock" "$src"
src_pid=$SERVER_PID
client_reads
copy_first $((4 * M)) b

# 3. --standby: the map is read at 'activate', not when the proxy starts.
start_server xnbd-server -u "$ssock" "$src"
src_pid=$SERVER_PID
start_proxy --target "$suri" --cache "$TESTDIR/cache2.img" \
  --bitmap "$TESTDIR/cache2.bitmap" --control "$TESTDIR/ctl2" -u "$TESTDIR/p2.sock" \
  --standby --cache-all --bg-rate 2M --bg-window 16M
wait_state "$TESTDIR/ctl2" proxying 30
qio "$suri" "read $((10 * M)) 4096" >/dev/null        # the VM, still at the source
map=$(read_map) || fail "reading the map failed"
[ "$map" = "10" ] || fail "the restarted server's map is '$map', not '10' (it starts empty)"
ctl_ok "$TESTDIR/ctl2" activate >/dev/null
wait_status "$TESTDIR/ctl2" 60 'j["background"]["recent_regions"] == 1 and j["background"]["recent_done"] == 1'
stop_ok "$src_pid" xnbd-server
timeout 30 qemu-img dd -f raw -O raw if="$(nbd_unix_uri "$TESTDIR/p2.sock")" \
  of="$TESTDIR/got.bin" bs=$M skip=10 count=11 >"$TESTDIR/dd.out" 2>&1 ||
  { cat "$TESTDIR/dd.out"; fail "region 10 does not read without the source after activate"; }
dd if="$src" of="$TESTDIR/want.bin" bs=$M skip=10 count=1 status=none
cmp "$TESTDIR/got.bin" "$TESTDIR/want.bin" || fail "region 10 differs from the source"

# 4. --no-read-map: no map export; a proxy copies in ascending order and says why.
start_server xnbd-server --no-read-map -u "$TESTDIR/s3.sock" "$src"
if nbdcopy "nbd+unix:///@xnbd-reads?socket=$TESTDIR/s3.sock" - >/dev/null 2>&1; then
  fail "the read map is served with --no-read-map"
fi
# (--bg-rate: a local copy of 64 MiB could complete, and drop the map's
# opener, before that opener is done: 4 s of copy leave it time.)
start_proxy --target "$(nbd_unix_uri "$TESTDIR/s3.sock")" --cache "$TESTDIR/cache3.img" \
  --bitmap "$TESTDIR/cache3.bitmap" --control "$TESTDIR/ctl3" -u "$TESTDIR/p3.sock" --cache-all \
  --bg-rate 16M
wait_for grep -q 'no read map' "$SERVER_LOG" || fail "the proxy did not log that the source has no read map"
wait_state "$TESTDIR/ctl3" complete 60
[ "$(proxy_status "$TESTDIR/ctl3" background.recent_regions)" = 0 ] || fail "regions from no map"
echo OK
