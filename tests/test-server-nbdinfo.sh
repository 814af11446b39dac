#!/usr/bin/env bash
# nbdinfo against xnbd-server: --list shows the default export and every
# --export; size, flags and block sizes are reported; --map on a sparse
# image shows holes where nothing was written and data where it was.
source "$(dirname "$0")/functions.sh"
requires nbdinfo

M=$((1024 * 1024))
img=$TESTDIR/sparse.img
foo=$TESTDIR/foo.img
make_sparse_image "$img" 64M
# Data at [0, 64k), [16M, 17M) and [40M+4k, 40M+8k); the rest is holes.
head -c 65536 /dev/urandom | dd of="$img" bs=64k conv=notrunc status=none
head -c $M /dev/urandom | dd of="$img" bs=1M seek=16 conv=notrunc status=none
head -c 4096 /dev/urandom | dd of="$img" bs=4k seek=$((40 * 256 + 1)) conv=notrunc status=none
make_image "$foo" 16M
make_sparse_image "$TESTDIR/bar.img" 1M

sock=$TESTDIR/sock
start_server xnbd-server -u "$sock" -e foo="$foo" -e bar="$TESTDIR/bar.img" "$img"
pid=$SERVER_PID
uri=$(nbd_unix_uri "$sock")

# ---- --list: all three exports
list=$(nbdinfo --list "$uri")
echo "$list"
for e in '' foo bar; do
  grep -qx "export=\"$e\":" <<<"$list" || fail "nbdinfo --list does not show export '$e'"
done
n=$(grep -c '^export=' <<<"$list")
[ "$n" -eq 3 ] || fail "nbdinfo --list shows $n exports, expected 3"

# ---- per-export details
field () { sed -n "s/^[[:space:]]*$1: \([^ ]*\).*/\1/p" <<<"$2" | head -n1; }
info=$(nbdinfo "$uri")
[ "$(field export-size "$info")" = $((64 * M)) ] || fail "default export size: $(field export-size "$info")"
info_foo=$(nbdinfo "$(nbd_unix_uri "$sock" foo)")
[ "$(field export-size "$info_foo")" = $((16 * M)) ] || fail "export foo size: $(field export-size "$info_foo")"
info_bar=$(nbdinfo "$(nbd_unix_uri "$sock" bar)")
[ "$(field export-size "$info_bar")" = $M ] || fail "export bar size: $(field export-size "$info_bar")"
for f in is_read_only:false can_flush:true can_fua:true can_trim:true can_zero:true; do
  [ "$(field "${f%%:*}" "$info")" = "${f#*:}" ] || fail "nbdinfo: ${f%%:*} is '$(field "${f%%:*}" "$info")', expected ${f#*:}"
done
grep -q 'base:allocation' <<<"$info" || fail "base:allocation context not listed"
min=$(field block_size_minimum "$info")
pref=$(field block_size_preferred "$info")
max=$(field block_size_maximum "$info")
[ -n "$min" ] && [ -n "$pref" ] && [ -n "$max" ] || fail "block sizes not shown"
[ "$min" -ge 1 ] && [ "$min" -le "$pref" ] && [ "$pref" -le "$max" ] ||
  fail "inconsistent block sizes $min/$pref/$max"
[ "$max" -ge $((32 * M)) ] || fail "maximum block size $max below the 32 MiB request limit"

# An unknown export is refused.
if nbdinfo "$(nbd_unix_uri "$sock" no-such-export)" >/dev/null 2>&1; then
  fail "nbdinfo succeeded on an export that does not exist"
fi

# ---- --map
map=$(nbdinfo --map "$uri")
echo "$map"
# type_at OFFSET: the description of the extent containing OFFSET
type_at () {
  awk -v o="$1" '$1 <= o && o < $1 + $2 { $1 = $2 = $3 = ""; sub(/^ +/, ""); print; exit }' <<<"$map"
}
for o in 0 $((64 * 1024 - 1)) $((16 * M)) $((17 * M - 1)) $((40 * M + 4096)) $((40 * M + 8191)); do
  t=$(type_at "$o")
  [ "$t" = data ] || fail "nbdinfo --map: offset $o is '$t', expected data"
done
for o in $((64 * 1024)) $((8 * M)) $((17 * M)) $((30 * M)) $((40 * M + 8192)) $((64 * M - 1)); do
  t=$(type_at "$o")
  [ "$t" = "hole,zero" ] || fail "nbdinfo --map: offset $o is '$t', expected hole,zero"
done
# The map covers the export exactly, without gaps or overlaps.
awk -v size=$((64 * M)) 'BEGIN { next_off = 0 }
  { if ($1 != next_off) { print "gap/overlap at " $1; exit 1 } next_off = $1 + $2 }
  END { if (next_off != size) { print "map ends at " next_off; exit 1 } }' <<<"$map" ||
  fail "nbdinfo --map does not tile the export"
# The totals agree: 64k + 1M + 4k of data.
data_bytes=$(awk '$4 == "data" { s += $2 } END { print s + 0 }' <<<"$map")
[ "$data_bytes" -eq $((65536 + M + 4096)) ] || fail "map reports $data_bytes bytes of data"

# All-hole export maps as one hole.
map_bar=$(nbdinfo --map "$(nbd_unix_uri "$sock" bar)")
[ "$(awk '{ print $4 }' <<<"$map_bar" | sort -u)" = "hole,zero" ] || fail "all-hole export map: $map_bar"

assert_alive "$pid"
echo OK
