#!/usr/bin/env bash
# D1: a source's block-status extents are clipped to the request and to the
# export, never trusted past them.  tests/tools/bad-source.py serves a 64 MiB
# image of 1 MiB runs of data and holes; its block-status replies are right
# for the range asked, then
#   bs-extra-extent: one more 8 MiB "hole, zero" extent past the request
#                    (past the export for the last range);
#   bs-huge-extent:  the last extent stretched to 0xFFFFF000 bytes (the range
#                    asked ends in a hole, so a hole that "runs on" for 4 GiB).
# libnbd 1.14 hands such extents to the extent callback as they are.  The
# proxy copies everything (--cache-all) and must end with a disk equal to
# the source, having skipped as zeros no more than the image's real holes.
#
# Fails before the D1 fix because the proxy marks the data beyond each
# request present as zeros: with bs-extra-extent it reaches "complete" with
# 8 MiB runs of real data read back as zeros; with bs-huge-extent everything
# from the first range's last hole to the end of the export reads as zeros.
# (Expected to fail until the engine's D1 fix lands.)
source "$(dirname "$0")/functions.sh"
requires qemu-img python3

M=$((1024 * 1024))
BAD=$XNBD_SRC/tests/tools/bad-source.py
src=$TESTDIR/src.img
# Seed 0: the MiB runs go random, written zeros, text, hole; so every 16 MiB
# range (the proxy's block-status query) ends in a hole followed by data.
make_image "$src" 64M 0
src_sha=$(sha "$src")
holes=$(python3 - "$src" <<'EOF'
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
size, pos, holes = os.fstat(fd).st_size, 0, 0
while pos < size:
    try:
        data = os.lseek(fd, pos, os.SEEK_DATA)
    except OSError:
        data = size
    holes += data - pos
    if data >= size:
        break
    pos = os.lseek(fd, data, os.SEEK_HOLE)
print(holes)
EOF
)
echo "source: 64 MiB, $holes bytes of holes"
if [ "$holes" -eq 0 ] || [ "$holes" -ge $((32 * M)) ]; then
  skip "the filesystem of $TESTDIR does not keep the image's holes ($holes bytes)"
fi

failures=()
for mode in bs-extra-extent bs-huge-extent; do
  ssock=$TESTDIR/$mode.src.sock psock=$TESTDIR/$mode.proxy.sock ctlsock=$TESTDIR/$mode.ctl
  counters=$TESTDIR/$mode.counters
  start_server "$BAD" --unix "$ssock" --counters "$counters" --misbehave "$mode" "$src"
  src_pid=$SERVER_PID
  start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$TESTDIR/$mode.cache" \
    --bitmap "$TESTDIR/$mode.bitmap" --control "$ctlsock" -u "$psock" \
    --cache-all --source-timeout 5
  wait_state "$ctlsock" complete 120
  s=$(ctl_ok "$ctlsock" status)
  echo "$mode: complete: $s"
  # Both variants run to the end; the failures are reported together.
  qemu-img compare -f raw -F raw "$src" "$(nbd_unix_uri "$psock")" ||
    failures+=("$mode: the proxy's disk differs from the source (extents past the request were trusted)")
  zero=$(json_get "$s" bytes.zero_skipped)
  [ "$zero" -le "$holes" ] ||
    failures+=("$mode: $zero bytes skipped as zeros, but the source has only $holes bytes of holes")
  stop_ok "$PROXY_PID" xnbd-proxy
  cmp -s "$TESTDIR/$mode.cache" "$src" ||
    failures+=("$mode: the cache image differs from the source")
  stop_ok "$src_pid" bad-source
  c=$(cat "$counters")
  echo "$mode: source counters: $c"
  # The fault was played (else this test would prove nothing).
  [ "$(json_get "$c" misbehaved)" -gt 0 ] ||
    fail "$mode: the source never sent a bad block-status reply (the proxy asked none?): $c"
done
[ "$(sha "$src")" = "$src_sha" ] || fail "the source image changed (I6)"
[ "${#failures[@]}" -eq 0 ] || fail "$(printf '%s; ' "${failures[@]}")"
echo OK
