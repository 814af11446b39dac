#!/usr/bin/env bash
# A proxy with seeds serves its clients at once, whatever its source's
# digest export does: the export is joined when it is ready, and the copy
# waits for it meanwhile (life.c, open_digests).  tests/tools/hold-relay.py
# stands between the proxy and an xnbd-server and holds every answer on
# the digest export's connection (the one that asks for "@xnbd-sha256")
# until the test creates a file.  A 16 MiB source, its seed a copy of it:
#   run 1 (release): the proxy comes up and a client's read returns the
#          source's bytes while the digest export is held, the copy having
#          fetched nothing; once released, the copy completes from the seed
#          (every data block but those the client read), and the disk equals the
#          source.  Before the change, the proxy answered no client (its
#          start joined the digest export first) until the export was in.
#   run 2 (close): the digest export's connection is closed instead: the
#          copy goes on without deduplication (everything fetched), says
#          why, and the disk equals the source.
#   run 3 (detach): detached (--force) while the export is held, the proxy
#          closes that connection itself (I7) and stops when asked.
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img python3

M=$((1024 * 1024))
HOLD=$XNBD_SRC/tests/tools/hold-relay.py
src=$TESTDIR/src.img seed=$TESTDIR/seed.img
make_image "$src" 16M 7
cp "$src" "$seed"
start_server xnbd-server -r -u "$TESTDIR/src.sock" "$src"

# hexdump FILE-OR-URI OFF LEN: the bytes as qemu-io prints them.
hexdump_of () {
  qemu-io -f raw -c "read -v $2 $3" "$1" | grep -v '^read\|ops/sec'
}

for mode in release close; do
  relay=$TESTDIR/$mode.relay.sock until=$TESTDIR/$mode.until
  ctlsock=$TESTDIR/$mode.ctl psock=$TESTDIR/$mode.sock
  uri=$(nbd_unix_uri "$psock")
  start_server "$HOLD" "$relay" "$TESTDIR/src.sock" "@xnbd-sha256" "$until" "$mode"
  start_proxy --target "$(nbd_unix_uri "$relay")" --cache "$TESTDIR/$mode.cache" \
    --bitmap "$TESTDIR/$mode.bm" --control "$ctlsock" -u "$psock" \
    --seed "$seed" --index "$TESTDIR/$mode.idx" --cache-all --source-timeout 120
  wait_state "$ctlsock" proxying 60

  # Held: a client's read is served (from the source), the copy waits.
  [ "$(hexdump_of "$uri" $((5 * M)) 64k)" = "$(hexdump_of "$src" $((5 * M)) 64k)" ] ||
    fail "$mode: a read while the digest export is held returned other bytes than the source's"
  s=$(ctl_ok "$ctlsock" status)
  echo "$mode: status while held: $s"
  [ "$(json_get "$s" bytes.fetched)" -eq $((64 * 1024)) ] ||
    fail "$mode: while the digest export is held the copy fetched, or the read did not: $s"
  [ "$(json_get "$s" bytes.seeded)" -eq 0 ] || fail "$mode: seeded before digests: $s"
  [ "$(json_get "$s" state)" = proxying ] || fail "$mode: not proxying while held: $s"

  touch "$until"
  wait_state "$ctlsock" complete 60
  s=$(ctl_ok "$ctlsock" status)
  echo "$mode: status at the end: $s"
  qemu-img compare -q -f raw -F raw "$src" "$uri" || fail "$mode: the proxy's disk differs from the source"
  if [ "$mode" = release ]; then
    seeded=$(json_get "$s" bytes.seeded) zero=$(json_get "$s" bytes.zero_skipped)
    [ "$seeded" -ge $((4 * M)) ] && [ $((seeded + zero)) -eq $((16 * M - 64 * 1024)) ] ||
      fail "release: not every non-zero block but the client's came from the seed: $s"
    [ "$(json_get "$s" bytes.fetched)" -eq $((64 * 1024)) ] ||
      fail "release: the copy fetched what the seed holds: $s"
    grep -q "the source publishes digests (joined after clients were let in)" "$PROXY_LOG" ||
      fail "release: the log does not say the digest export was joined late"
  else
    [ "$(json_get "$s" bytes.seeded)" -eq 0 ] || fail "close: seeded without digests: $s"
    [ $(($(json_get "$s" bytes.fetched) + $(json_get "$s" bytes.zero_skipped))) -eq $((16 * M)) ] ||
      fail "close: not every data block fetched: $s"
    grep -q "publishes no block digests" "$PROXY_LOG" ||
      fail "close: the log does not say why the seeds were not used"
    grep -q "copying without deduplication" <<<"$(json_get "$s" last_error)" ||
      fail "close: last_error does not say the copy went on without deduplication: $s"
  fi
  cmp -s "$src" "$seed" || fail "$mode: the seed changed"
  stop_ok "$PROXY_PID"
done

# Run 3 (detach): the digest export still held when the proxy detaches
# (--force, the copy waiting for digests): the proxy gives the export's
# connection up -- it is closed from the proxy's side, nothing more goes
# to the source (I7) -- and stops at once when asked.
relay=$TESTDIR/detach.relay.sock rlog=$TESTDIR/detach.relay.log ctlsock=$TESTDIR/detach.ctl
start_server "$HOLD" "$relay" "$TESTDIR/src.sock" "@xnbd-sha256" "$TESTDIR/never" release "$rlog"
start_proxy --target "$(nbd_unix_uri "$relay")" --cache "$TESTDIR/detach.cache" \
  --bitmap "$TESTDIR/detach.bm" --control "$ctlsock" -u "$TESTDIR/detach.sock" \
  --seed "$seed" --index "$TESTDIR/detach.idx" --cache-all --source-timeout 120
wait_state "$ctlsock" proxying 60
wait_for grep -q "^held " "$rlog" || fail "detach: the digest export's connection was never held"
ctl_ok "$ctlsock" "detach --force" >/dev/null
wait_state "$ctlsock" detached 30
held=$(awk '/^held /{print $2}' "$rlog")
wait_for grep -q "^client-closed $held\$" "$rlog" ||
  fail "detach: the proxy kept its connection to the digest export open after detach"
stop_ok "$PROXY_PID"
echo "PASS"
