#!/usr/bin/env bash
# D5: a source connection that stops making progress is declared dead and
# replaced.  tests/tools/bad-source.py plays, until the test creates its
# "fixed" file,
#   stall-mid-reply: every read gets a reply header and half the data, then
#                    silence (the socket stays open);
#   never-reply:     every read gets no reply at all, then silence.
# With --source-timeout 5: a client read of a missing block while the source
# is broken fails with EIO (bounded, not a hang).  Then the source is fixed:
# reads of missing blocks -- one never asked before, and the one that
# failed -- must succeed with the right data (a few tries within 60 s are
# allowed, for the stalled connection to be noticed and replaced), and
# last_error must say what happened.
#
# Fails before the D5 fix because the stalled connection is never given up:
# libnbd sees it open and idle, so status says both connections up and
# last_error stays empty; every later miss waits behind the half reply and
# fails with EIO after --source-timeout, even after the source was fixed.
# The first 16 reads are answered: they are the proxy's start-up identity
# samples (common/source/identity.c); a source broken from the first byte
# is refused at start-up, with a message, which is right too.
source "$(dirname "$0")/functions.sh"
requires qemu-io python3

M=$((1024 * 1024))
BAD=$XNBD_SRC/tests/tools/bad-source.py
src=$TESTDIR/src.img
make_image "$src" 64M 4
src_sha=$(sha "$src")

# hexdump FILE-OR-URI OFF LEN: the bytes as qemu-io prints them.
hexdump_of () {
  qemu-io -f raw -c "read -v $2 $3" "$1" | grep -v '^read\|ops/sec'
}

failures=()
for mode in stall-mid-reply never-reply; do
  ssock=$TESTDIR/$mode.src.sock psock=$TESTDIR/$mode.proxy.sock ctlsock=$TESTDIR/$mode.ctl
  counters=$TESTDIR/$mode.counters fixed=$TESTDIR/$mode.fixed
  uri=$(nbd_unix_uri "$psock")
  start_server "$BAD" --unix "$ssock" --counters "$counters" --misbehave "$mode:nth=17,until=$fixed" "$src"
  src_pid=$SERVER_PID
  start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$TESTDIR/$mode.cache" \
    --bitmap "$TESTDIR/$mode.bitmap" --control "$ctlsock" -u "$psock" --source-timeout 5
  wait_state "$ctlsock" proxying 30

  # Broken source: the read fails with EIO, and does not hang.
  st=0
  out=$(timeout 60 qemu-io -f raw -c "read $((8 * M)) 64k" "$uri" 2>&1) || st=$?
  echo "$mode: read while the source is broken: exit $st: $out"
  [ "$st" -ne 124 ] || fail "$mode: a read still waited after 60 s with --source-timeout 5"
  grep -qi 'Input/output error' <<<"$out" ||
    fail "$mode: a read while the source is broken did not fail with EIO: $out"
  echo "$mode: status while broken: $(ctl_ok "$ctlsock" status)"

  # Fixed: a read never asked before succeeds (tries bounded: 6, each at
  # most 20 s, at most 60 s in all).
  touch "$fixed"
  ok=0 t0=$SECONDS
  for (( try = 1; try <= 6 && SECONDS - t0 < 60; try++ )); do
    st=0
    out=$(timeout 20 qemu-io -f raw -c "read -v $((40 * M)) 64k" "$uri" 2>&1) || st=$?
    if [ "$st" -eq 0 ] && ! grep -qi 'error\|fail' <<<"$out"; then ok=1; break; fi
    echo "$mode: after the fix, try $try: exit $st: $(grep -i 'error\|fail' <<<"$out" | head -1)"
  done
  s=$(ctl_ok "$ctlsock" status)
  echo "$mode: status after the fix: $s"
  echo "$mode: source counters: $(cat "$counters")"
  if [ "$ok" -eq 1 ]; then
    [ "$(grep -v '^read\|ops/sec' <<<"$out")" = "$(hexdump_of "$src" $((40 * M)) 64k)" ] ||
      failures+=("$mode: after the fix, a read returned wrong data")
    # The read that failed earlier now succeeds too, with the right data.
    st=0
    out=$(timeout 20 qemu-io -f raw -c "read -v $((8 * M)) 64k" "$uri" 2>&1) || st=$?
    [ "$st" -eq 0 ] && [ "$(grep -v '^read\|ops/sec' <<<"$out")" = "$(hexdump_of "$src" $((8 * M)) 64k)" ] ||
      failures+=("$mode: after the fix, the block that failed still does not read right (exit $st)")
  else
    failures+=("$mode: after the source was fixed, reads of missing blocks still fail (no reconnect)")
  fi
  err=$(json_get "$s" last_error)
  [ -n "$err" ] && [ "$err" != none ] ||
    failures+=("$mode: last_error does not say that a source connection stalled: '$err'")
  assert_alive "$PROXY_PID"
  stop_ok "$PROXY_PID" xnbd-proxy
  stop_ok "$src_pid" bad-source        # its counters file is final now
  [ "$(json_get "$(cat "$counters")" misbehaved)" -gt 0 ] ||
    fail "$mode: the source never misbehaved: $(cat "$counters")"
done
[ "$(sha "$src")" = "$src_sha" ] || fail "the source image changed (I6)"
[ "${#failures[@]}" -eq 0 ] || fail "$(printf '%s; ' "${failures[@]}")"
echo OK
