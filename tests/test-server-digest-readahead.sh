#!/usr/bin/env bash
# xnbd-server's digest read-ahead (digest-backend.h): after a digest read
# of at least 1024 blocks, the next as many blocks' digests, and at least
# 16384 (to the image's end), are computed while the queue is idle -- into
# the sidecar, or (an image without one) into a stash.  What a read-ahead
# computed is never served stale: a write through the server, and one
# behind its back, after the read-ahead finished show in the next read;
# and when nothing changed, the next read is served from the stash (its
# log says so) with the right digests, also a read that begins in the
# stash and ends past it (the rest computed).  Both with a sidecar (the
# default identity) and without (--image-id=stat).
source "$(dirname "$0")/functions.sh"
source "$XNBD_SRC/tests/digest-common.sh"
requires nbdsh qemu-io sha256sum split xxd
nbdsh () { /usr/bin/python3 -m nbd "$@"; }

sock=$TESTDIR/sock
N=1024                          # blocks per read: the read-ahead's minimum
AHEAD=16384                     # blocks read ahead at least
TOTAL=20480                     # blocks of the image (80 MiB)

# digests_of FIRST OUT [COUNT]: the digests of blocks FIRST..FIRST+COUNT-1
# (N), read from the digest export in one request.
digests_of ()
{
  nbdsh -u "$(digest_uri "$sock")" \
    -c "import sys; sys.stdout.buffer.write(h.pread(${3:-$N} * 32, $1 * 32))" >"$2"
}

# expect_digests FIRST GOT [COUNT]: GOT equals sha256sum of those blocks now.
expect_digests ()
{
  dd if="$img" of="$TESTDIR/part.img" bs=4096 skip="$1" count="${3:-$N}" status=none
  block_digests "$TESTDIR/part.img" "$TESTDIR/want.bin"
  same_content "$TESTDIR/want.bin" "$2"
}

# read_ahead_done FIRST: the server's log says the blocks from FIRST were
# read ahead (AHEAD of them, or to the image's end).
read_ahead_done ()
{
  local n=$(( TOTAL - $1 < AHEAD ? TOTAL - $1 : AHEAD ))
  grep -q "digests of blocks $1+$n read ahead" "$SERVER_LOG"
}

for mode in sidecar stat; do
  img=$TESTDIR/disk-$mode.img
  make_image "$img" $(( TOTAL * 4 ))K 5
  # An old mtime: a write behind the server's back changes it whatever
  # the clock's granularity.
  touch -d '2001-01-01 00:00:00' "$img"
  start_server xnbd-server -v --image-id=$mode -u "$sock" "$img"
  pid=$SERVER_PID
  if [ $mode = stat ]; then
    grep -q 'no digest sidecar' "$SERVER_LOG" || fail "$mode: the image has a sidecar"
  fi

  # A write through the server after the read-ahead of blocks N..2N-1.
  digests_of 0 "$TESTDIR/d0.bin"
  expect_digests 0 "$TESTDIR/d0.bin"
  wait_for read_ahead_done $N || fail "$mode: no read-ahead of blocks $N+$N"
  qio "$(nbd_unix_uri "$sock")" "write -P 0x6b $(( (N + 500) * 4096 + 100 )) 33"
  digests_of $N "$TESTDIR/d1.bin"
  expect_digests $N "$TESTDIR/d1.bin"
  grep -q "digests of blocks $N+$N: .*read ahead" "$SERVER_LOG" &&
    fail "$mode: digests read ahead were served after a write through the server"

  # A write behind the server's back after the read-ahead of 2N..3N-1.
  wait_for read_ahead_done $(( 2 * N )) || fail "$mode: no read-ahead of blocks $(( 2 * N ))+$N"
  printf 'behind the back' |
    dd of="$img" bs=1 seek=$(( (2 * N + 7) * 4096 )) conv=notrunc status=none
  digests_of $(( 2 * N )) "$TESTDIR/d2.bin"

  # Nothing changed after the read-ahead of 3N..4N-1: served from what
  # was read ahead (without a sidecar, from the stash), and right.  (Read
  # before the digests are checked: hashing the image here takes about as
  # long as a stash is kept.)
  wait_for read_ahead_done $(( 3 * N )) || fail "$mode: no read-ahead of blocks $(( 3 * N ))+$N"
  digests_of $(( 3 * N )) "$TESTDIR/d3.bin"
  expect_digests $(( 2 * N )) "$TESTDIR/d2.bin"
  expect_digests $(( 3 * N )) "$TESTDIR/d3.bin"
  if [ $mode = stat ]; then
    grep -q "digests of blocks $(( 3 * N ))+$N: .*read ahead" "$SERVER_LOG" ||
      fail "$mode: blocks $(( 3 * N ))+$N were not served from the read-ahead"
  fi

  # A read of the image's first 2048 blocks (as a proxy's first), then,
  # once the blocks after it were read ahead, one that begins in them and
  # ends past them: the read-ahead's part and the rest, right.
  ahead_lines () { grep -c "digests of blocks 2048+$AHEAD read ahead" "$SERVER_LOG" || true; }
  ahead_more () { [ "$(ahead_lines)" -gt "$before" ]; }
  before=$(ahead_lines)
  digests_of 0 "$TESTDIR/d4.bin" 2048
  wait_for ahead_more || fail "$mode: no read-ahead of blocks 2048+$AHEAD"
  first=$(( 2048 + AHEAD - 1024 ))
  digests_of $first "$TESTDIR/d5.bin" 2048
  expect_digests 0 "$TESTDIR/d4.bin" 2048
  expect_digests $first "$TESTDIR/d5.bin" 2048
  if [ $mode = stat ]; then
    grep -q "digests of blocks $first+2048: .*read ahead" "$SERVER_LOG" ||
      fail "$mode: blocks $first+2048 were not served from the read-ahead in part"
  fi
  assert_alive "$pid"
  stop_ok "$pid" xnbd-server
done
echo OK
