#!/usr/bin/env bash
# The seed index file (--index): damaged or foreign index files are rebuilt
# with a warning and the migration is still correct; a file that is not an
# index is refused with a clear message and left byte-identical.
#
# Seed: 8 MiB of random data.  Source (12 MiB): the seed's second half,
# 4 MiB new, the seed's first half, so a correct migration seeds 8 MiB.
#   run 1: the index is built (2048 blocks hashed) and written.
#   run 2: bytes flipped in a seed's key list: warning ("damaged"), rebuilt
#          (hashed again), migration correct, 8 MiB seeded; the rebuilt
#          file is used as is by the next start (0 hashed).
#   run 3: a byte flipped in the header: the same.
#   run 4: an index built for another seed: warning, rebuilt, correct.
#   run 5: --index naming a disk image, a text file, a directory: refused
#          (exit 1, the reason on stderr), nothing created, the file as it was.
source "$(dirname "$0")/functions.sh"
requires qemu-img

M=$((1024 * 1024))
seed=$TESTDIR/seed.img other=$TESTDIR/other.img src=$TESTDIR/src.img idx=$TESTDIR/seeds.index
head -c $((8 * M)) /dev/urandom >"$seed"
head -c $((2 * M)) /dev/urandom >"$other"
{ tail -c $((4 * M)) "$seed"; head -c $((4 * M)) /dev/urandom; head -c $((4 * M)) "$seed"; } >"$src"
seed_sha=$(sha "$seed")
start_server xnbd-server -r -u "$TESTDIR/src.sock" "$src"
suri=$(nbd_unix_uri "$TESTDIR/src.sock")

proxy_args () {   # NAME: the options of a proxy run NAME (without seeds and index)
  printf '%s\n' --target "$suri" --cache "$TESTDIR/$1.cache" --bitmap "$TESTDIR/$1.bm" \
    --control "$TESTDIR/$1.ctl" -u "$TESTDIR/$1.sock"
}
run () {          # NAME SEED HASHED: start over SEED with --index, expect HASHED blocks hashed
  local n=$1 s=$2 hashed=$3 args
  mapfile -t args < <(proxy_args "$n")
  start_proxy "${args[@]}" --seed "$s" --index "$idx"
  wait_state "$TESTDIR/$n.ctl" proxying 30
  grep -q "blocks indexed ($hashed hashed now)" "$PROXY_LOG" ||
    fail "$n: expected $hashed blocks hashed: $(grep -i 'dedup\|index' "$PROXY_LOG")"
}
migrate () {      # NAME: cache-all, the disk equals the source, 8 MiB seeded
  local n=$1 s
  ctl_ok "$TESTDIR/$n.ctl" cache-all >/dev/null
  wait_state "$TESTDIR/$n.ctl" complete 60
  qemu-img compare -q -f raw -F raw "$src" "$(nbd_unix_uri "$TESTDIR/$n.sock")" ||
    fail "$n: the proxy's disk differs from the source"
  s=$(ctl_ok "$TESTDIR/$n.ctl" status)
  [ "$(json_get "$s" bytes.seeded)" -eq $((8 * M)) ] || fail "$n: bytes.seeded is not 8 MiB: $s"
}
flip () {         # FILE OFFSET: inverts one byte
  python3 - "$1" "$2" <<'EOF'
import sys
path, off = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    f.seek(off); b = f.read(1); f.seek(off); f.write(bytes([b[0] ^ 0xff]))
EOF
}
warned () {       # WHAT: the last proxy's log has a warning containing WHAT and "rebuilding it"
  grep "warning" "$PROXY_LOG" | grep "rebuilding it" | grep -q "$1" ||
    fail "no warning '$1 ... rebuilding it' in the log: $(grep -i 'index' "$PROXY_LOG")"
  grep "warning" "$PROXY_LOG" | grep "rebuilding it"
}

# Run 1.
run r1 "$seed" 2048
stop_ok "$PROXY_PID" xnbd-proxy
[ "$(head -c 8 "$idx")" = XNBDINDX ] || fail "no index file written at $idx"
size=$(stat -c %s "$idx")

# Run 2: a damaged key list (the last of the seed's 2048 keys, and one in
# the middle).
flip "$idx" $((size - 3))
flip "$idx" $((size - 8 * 1000))
run r2 "$seed" 2048
warned "damaged"
migrate r2
stop_ok "$PROXY_PID" xnbd-proxy
run r2b "$seed" 0                   # the rebuilt file is good
stop_ok "$PROXY_PID" xnbd-proxy

# Run 3: a damaged header (the table entries field, past the magic).
flip "$idx" 45
run r3 "$seed" 2048
warned "header fails its checksum"
migrate r3
stop_ok "$PROXY_PID" xnbd-proxy

# Run 4: an index built for another seed.
rm "$idx"
run r4a "$other" 512
stop_ok "$PROXY_PID" xnbd-proxy
run r4 "$seed" 2048
warned "built for other seeds"
migrate r4
stop_ok "$PROXY_PID" xnbd-proxy
[ "$(sha "$seed")" = "$seed_sha" ] || fail "the seed was modified"

# Run 5: files that are not index files.
cp "$src" "$TESTDIR/disk.img"
printf "precious notes, not an index %d\n" {1..300} >"$TESTDIR/notes.txt"
mkdir "$TESTDIR/adir"
for f in "$TESTDIR/disk.img" "$TESTDIR/notes.txt" "$TESTDIR/adir"; do
  before=$( [ -d "$f" ] && echo dir || sha "$f")
  mapfile -t args < <(proxy_args r5)
  st=0
  timeout 60 "$XNBD_BUILD/xnbd-proxy" "${args[@]}" --seed "$seed" --index "$f" \
    </dev/null >/dev/null 2>"$TESTDIR/r5.err" || st=$?
  echo "--index ${f##*/}: exit $st: $(tail -1 "$TESTDIR/r5.err")"
  [ "$st" -eq 1 ] || fail "--index ${f##*/}: exit status $st, expected 1 (refused)"
  if [ -d "$f" ]; then
    grep -q "is not a regular file" "$TESTDIR/r5.err" || fail "--index ${f##*/}: unclear refusal"
  else
    grep -q "is not an xnbd index file.*refusing to overwrite it" "$TESTDIR/r5.err" ||
      fail "--index ${f##*/}: unclear refusal"
    [ "$(sha "$f")" = "$before" ] || fail "--index ${f##*/}: the file was modified"
  fi
  [ ! -e "$TESTDIR/r5.cache" ] && [ ! -e "$TESTDIR/r5.bm" ] && [ ! -e "$TESTDIR/r5.ctl" ] ||
    fail "--index ${f##*/}: the refused start left files behind"
  ! ls "$f".tmp.* >/dev/null 2>&1 || fail "--index ${f##*/}: a temporary index file was left"
done
[ "$(ls -A "$TESTDIR/adir")" = "" ] || fail "files were created in the directory named by --index"
echo OK
