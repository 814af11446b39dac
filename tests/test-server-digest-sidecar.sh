#!/usr/bin/env bash
# The digest sidecar of xnbd-server (IMAGE.xnbd-sha256, digest-sidecar.h):
# digests computed once are served from it after a restart (the server's
# count at exit says how many came from it and how many were computed);
# every digest served equals sha256sum of its block; a write through the
# server invalidates its block (also across a restart); an image edited
# while no server ran, a server killed after a write, or a sidecar that is
# damaged, truncated, foreign or has entries moved: the sidecar is
# discarded or its bad entries ignored, with a log line; a sidecar that
# cannot be opened or created (its name taken, a read-only directory)
# leaves digests computed at each read.
source "$(dirname "$0")/functions.sh"
source "$XNBD_SRC/tests/digest-common.sh"
requires nbdcopy qemu-io xxd sha256sum split cmp

img=$TESTDIR/disk.img
make_image "$img" 8M 5
printf 'a partial last block' >>"$img"
blocks=$(( (8 * 1048576 + 20 + 4095) / 4096 ))
sc=$img.xnbd-sha256
sock=$TESTDIR/sock

# serve: start the server on $img; digests_ok: all digests read through the
# server equal sha256sum's; counts FROM COMPUTED: stop it and check the
# count it logged.
serve () { start_server xnbd-server -u "$sock" "$@" "$img"; }
want_of=   # the image's sha256 when want.bin was computed (it is slow)
digests_ok ()
{
  nbdcopy "$(digest_uri "$sock")" "$TESTDIR/got.bin"
  local now
  now=$(sha "$img")
  if [ "$now" != "$want_of" ]; then
    block_digests "$img" "$TESTDIR/want.bin"
    want_of=$now
  fi
  same_content "$TESTDIR/want.bin" "$TESTDIR/got.bin"
}
counts ()
{
  stop_ok "$SERVER_PID" xnbd-server
  grep -q "digest sidecar $sc: $1 digests read from it, $2 computed and stored\$" "$SERVER_LOG" ||
    fail "expected $1 digests from the sidecar and $2 computed; log: $(grep 'digest sidecar' "$SERVER_LOG")"
}
logged () { grep -q "$1" "$SERVER_LOG" || fail "no log line '$1': $(grep 'digest sidecar' "$SERVER_LOG")"; }
# The bytes of entry B (digest and tag) of the sidecar.
entry_off () { echo $(( 128 + 40 * $1 )); }

# ---- first run: every digest computed and kept; a second read is served
# from the sidecar.
serve
digests_ok
logged "digest sidecar: $sc created for"
[ "$(stat -c %s "$sc")" -eq $(( 128 + 40 * blocks )) ] || fail "sidecar size $(stat -c %s "$sc")"
[ "$(head -c 8 "$sc")" = XNBDSIDE ] || fail "sidecar magic: $(head -c 8 "$sc" | xxd -p)"
digests_ok
counts "$blocks" "$blocks"

# ---- restart: all from the sidecar, nothing computed.
serve
logged "digest sidecar: $sc matches"
digests_ok
counts "$blocks" 0

# ---- a write through the server: the next read has the new digest; after
# a restart only that block is computed again.
serve
digests_ok
qio "$(nbd_unix_uri "$sock")" "write -P 0x5a $(( 100 * 4096 + 10 )) 17"
cp "$TESTDIR/got.bin" "$TESTDIR/before.bin"
digests_ok
cmp -s "$TESTDIR/before.bin" "$TESTDIR/got.bin" && fail "digests unchanged after a write"
counts $(( 2 * blocks - 1 )) 1
serve
digests_ok
counts "$blocks" 0
# A zero through the server too (block 3, partly).
serve
qio "$(nbd_unix_uri "$sock")" "write -z $(( 3 * 4096 + 100 )) 200"
digests_ok
counts $(( blocks - 1 )) 1

# ---- the image edited while no server ran: generation bumped, sidecar
# rebuilt, all computed.
printf 'edited offline' | dd of="$img" bs=1 seek=$(( 9 * 4096 )) conv=notrunc status=none
serve
logged "digest sidecar: $sc is discarded and rebuilt: made for another generation"
digests_ok
counts 0 "$blocks"

# ---- SIGKILL after a write through the server (its invalidation in the
# sidecar may not have reached the disk): the identity record still says
# "open" and the image's times changed, so the generation goes up and the
# sidecar is rebuilt.
serve
digests_ok
qio "$(nbd_unix_uri "$sock")" "write -P 0x77 $(( 50 * 4096 )) 4096"
kill -KILL "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
serve
logged "digest sidecar: $sc is discarded and rebuilt: made for another generation"
digests_ok
counts 0 "$blocks"

# ---- damaged entries: one byte of block 7's digest flipped, entry 20
# copied over entry 8 (the tag binds the block number): only those are
# computed (neighbours, so that the span computed, from the first to the
# last missing block of a chunk, is just those two).
stop_entry_patch ()
{
  local b=$1 off
  off=$(entry_off "$b")
  printf '\xff' | dd of="$sc" bs=1 seek=$(( off + 5 )) conv=notrunc status=none
  dd if="$sc" of="$sc" bs=1 skip="$(entry_off 20)" seek="$(entry_off 8)" count=40 \
    conv=notrunc status=none
}
stop_entry_patch 7
serve
logged "digest sidecar: $sc matches"
digests_ok
counts $(( blocks - 2 )) 2

# ---- a damaged header, a truncated or extended sidecar, another size's
# sidecar: rebuilt with the reason logged, digests right.
damage ()
{
  local what=$1 why=$2
  case $what in
    magic) printf 'XNBDXXXX' | dd of="$sc" conv=notrunc status=none ;;
    version) printf '\0\0\0\x09' | dd of="$sc" bs=1 seek=8 conv=notrunc status=none ;;
    reserved) printf '\x01' | dd of="$sc" bs=1 seek=100 conv=notrunc status=none ;;
    truncated) truncate -s -17 "$sc" ;;
    tiny) truncate -s 50 "$sc" ;;
    longer) truncate -s +40 "$sc" ;;
    size) printf '\x7f' | dd of="$sc" bs=1 seek=23 conv=notrunc status=none ;;
    id) printf 'ffff' | dd of="$sc" bs=1 seek=24 conv=notrunc status=none ;;
  esac
  serve
  logged "digest sidecar: $sc is discarded and rebuilt: $why"
  digests_ok
  counts 0 "$blocks"
}
damage magic "not a digest sidecar"
damage version "unknown version"
damage reserved "damaged header"
damage truncated "truncated"
damage tiny "it is shorter than its header"
damage longer "longer than its entries"
damage size "made for another image size"
damage id "made for another image identity"

# ---- no sidecar can be kept (its name taken by a directory): digests are
# computed at each read, the server runs normally.
rm -f "$sc"
mkdir "$sc"
serve
logged "digest sidecar: cannot open $sc"
digests_ok
qio "$(nbd_unix_uri "$sock")" "write -P 0x33 0 4096"
digests_ok
stop_ok "$SERVER_PID" xnbd-server
grep -q "digests read from it" "$SERVER_LOG" && fail "a sidecar was used: $(grep 'digest sidecar' "$SERVER_LOG")"
rmdir "$sc"

# ---- no recorded identity (--image-id=stat): no sidecar written.
serve --image-id=stat
logged "no digest sidecar"
digests_ok
stop_ok "$SERVER_PID" xnbd-server
[ ! -e "$sc" ] || fail "--image-id=stat wrote $sc"
# ---- a read-only directory: the server runs as nobody, the image's
# directory is root's.  The identity record made by an earlier run (as
# root) is still read, but no sidecar can be created next to the image:
# digests are computed at each read, with one log line.
if command -v setpriv >/dev/null && getent passwd nobody >/dev/null; then
  rodir=$TESTDIR/ro
  mkdir "$rodir"
  cp "$img" "$rodir/disk.img"
  chmod 666 "$rodir/disk.img"          # before the record: chmod changes ctime
  img=$rodir/disk.img sc=$rodir/disk.img.xnbd-sha256
  serve
  digests_ok
  counts 0 "$blocks"
  rm "$sc"
  chmod 755 "$rodir"
  chmod 1777 "$TESTDIR"                # the pid file and the socket
  nobody=$TESTDIR/as-nobody
  printf '#!/bin/sh\nexec setpriv --reuid=nobody --regid=nogroup --clear-groups %q "$@"\n' \
    "$XNBD_BUILD/xnbd-server" >"$nobody"
  chmod 755 "$nobody"
  start_server "$nobody" -u "$sock" "$img"
  logged "digest sidecar: cannot create $sc"
  grep "digest sidecar\|image identity" "$SERVER_LOG"
  digests_ok
  qio "$(nbd_unix_uri "$sock")" "write -P 0x44 8192 4096"
  digests_ok
  stop_ok "$SERVER_PID" xnbd-server
  [ ! -e "$sc" ] || fail "a sidecar was made in a read-only directory"
else
  echo "skipped the read-only directory case: no setpriv or no user nobody"
fi
echo OK
