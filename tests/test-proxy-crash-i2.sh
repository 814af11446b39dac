#!/usr/bin/env bash
# Invariant I2 (bit implies data; flushed data survives a crash) of
# xnbd-proxy, by killing it with SIGKILL at random instants.
#
# One xnbd-server serves a 16 MiB source image that never changes.  Each
# run starts a fresh proxy (new cache and bitmap, --cache-all with a rate
# cap so the background copy runs during the workload, --persist-interval
# 50) and runs crashload against it: whole-block, partial and
# block-straddling writes with unique stamps, some FUA, a FLUSH every 2-8
# writes, up to 8 in flight, each event journalled.  After a random delay
# the proxy is killed; a new proxy starts on the same cache, bitmap and
# source, and "crashload verify" reads the whole export: every sector must
# be the source's data or an issued write, and never older than the last
# write a completed FLUSH (or FUA) covered.  A second full read
# (qemu-img compare against what verify read) must agree.  The restarted
# proxy starts without --cache-all (so blocks.present shows what the bitmap
# file held) and is then told cache-all, so verify races the background
# copy.  A run that breaks I2 prints its MISMATCH lines (block, allowed
# candidates, what was found) and keeps its journal in test-logs/; the
# other runs still go, and the test fails at the end.  At the end the
# source image must be unchanged (I6).
#
# SIGKILL loses no data the proxy already handed to the kernel, so this
# checks the ORDER of things (data written before its bit is persisted,
# flush replies after the bits reached the bitmap file), not fsync itself.
#
# Environment: CRASH_SEED=N reproduces a run sequence (printed at the
# start), CRASH_RUNS=N changes the number of runs (default 30).
source "$(dirname "$0")/functions.sh"
requires qemu-img cmp

CRASHLOAD=$XNBD_BUILD/tests/crashload
SOCKCMD=$XNBD_BUILD/tests/sockcmd
[ -x "$CRASHLOAD" ] || fail "$CRASHLOAD not built (run make)"
[ -x "$SOCKCMD" ] || fail "$SOCKCMD not built (run make)"
# shellcheck disable=SC2034  # read by wait_for in functions.sh
WAIT_TRIES=300              # conditions get up to 30 s on a loaded machine

runs=${CRASH_RUNS:-30}
seed=${CRASH_SEED:-$(( $(date +%s%N) / 1000 % 1000000 ))}
echo "seed $seed, $runs runs (reproduce with CRASH_SEED=$seed)"
RANDOM=$seed

img=$TESTDIR/source.img
cache=$TESTDIR/cache.img
bitmap=$TESTDIR/cache.bitmap
ctl=$TESTDIR/ctl.sock
psock=$TESTDIR/proxy.sock
journal=$TESTDIR/journal
dump=$TESTDIR/dump.img
puri=$(nbd_unix_uri "$psock")

make_image "$img" 16M
img_sha=$(sha "$img")
start_server xnbd-server -u "$TESTDIR/source.sock" "$img"
source_pid=$SERVER_PID
suri=$(nbd_unix_uri "$TESTDIR/source.sock")

status () { "$SOCKCMD" -t 10 "$ctl" status "$@"; }
status_is () {
  local got
  # shellcheck disable=SC2086  # $1 is a list of member paths
  got=$(status $1 2>/dev/null) || return 1
  [ "$got" = "$2" ]
}

# A fresh proxy must be proxying.  A restarted one may also be detached:
# its cache was complete at the start (the workload's whole-block writes
# and the copy covered every block before the crash; fast disks, where
# FLUSH costs nothing).
restarted_up () { status_is state proxying || status_is state detached; }
pargs=(--target "$suri" --cache "$cache" --bitmap "$bitmap" --control "$ctl"
       -u "$psock" --bg-rate 4M --persist-interval 50)
proxy_up () {   # --cache-all (a fresh cache)
  start_proxy "${pargs[@]}" "$@"
  wait_for status_is state proxying ||
    fail "the proxy did not reach state proxying: $(status state last_error)"
}
proxy_restart () {
  start_proxy "${pargs[@]}"
  wait_for restarted_up ||
    fail "the restarted proxy did not reach state proxying or detached: $(status state last_error)"
}

failed_runs=0
total_writes=0 total_acked=0 total_flushed=0 total_unacked_landed=0
for (( run = 1; run <= runs; run++ )); do
  rm -f "$cache" "$bitmap" "$journal" "$dump"
  lseed=$(( seed * 1000 + run ))
  # The one delay that is not a wait for a condition: it picks the crash
  # instant, 0-1000 ms after the workload connected.
  delay_ms=$(( RANDOM % 1001 ))

  proxy_up --cache-all
  log1=$PROXY_LOG
  timeout 60 "$CRASHLOAD" write --uri "$puri" --journal "$journal" \
    --seed "$lseed" --seconds 8 >"$TESTDIR/write.out" 2>&1 &
  load_pid=$!
  wait_for test -s "$journal" || {
    cat "$TESTDIR/write.out" >&2
    fail "run $run: crashload did not start (no journal)"
  }
  sleep "$(printf '%d.%03d' $(( delay_ms / 1000 )) $(( delay_ms % 1000 )))"
  load_done_before=no
  kill -0 "$load_pid" 2>/dev/null || load_done_before=yes
  st=0; stop_server "$PROXY_PID" KILL 2>/dev/null || st=$?  # no "Killed" job notice
  [ "$st" -eq 137 ] || fail "run $run: xnbd-proxy exit status $st after SIGKILL (expected 137)"
  st=0; wait "$load_pid" || st=$?
  [ "$st" -eq 0 ] || {
    cat "$TESTDIR/write.out" >&2
    fail "run $run: crashload write failed (exit $st)"
  }
  # Before the kill, the workload may only have stopped at its time limit
  # (a slow machine), never because the proxy dropped it.
  if [ "$load_done_before" = yes ] && ! grep -q 'time limit reached' "$TESTDIR/write.out"; then
    cat "$TESTDIR/write.out" >&2
    fail "run $run: the workload's connection ended before the proxy was killed"
  fi

  # Restarted without --cache-all, so blocks.present is what the bitmap
  # file held; then the background copy runs while verify reads.
  proxy_restart
  log2=$PROXY_LOG
  present=$(status blocks.present)
  "$SOCKCMD" -t 10 "$ctl" cache-all ok >/dev/null ||
    fail "run $run: cache-all on the restarted proxy failed"
  st=0
  "$CRASHLOAD" verify --uri "$puri" --journal "$journal" --source "$img" \
    --dump "$dump" >"$TESTDIR/verify.out" 2>&1 || st=$?
  if [ "$st" -ne 0 ]; then
    [ "$st" -eq 1 ] || {
      cat "$TESTDIR/verify.out" >&2
      fail "run $run: crashload verify could not check the export (exit $st)"
    }
    # Content broke I2: report this run in full, go on with the others.
    echo "run $run/$runs FAILED: crash at $delay_ms ms (crashload seed $lseed):"
    cat "$TESTDIR/write.out" "$TESTDIR/verify.out"
    keep=$XNBD_BUILD/test-logs/test-proxy-crash-i2.run$run.journal
    mkdir -p "${keep%/*}" && cp "$journal" "$keep" && echo "journal kept in $keep"
    failed_runs=$(( failed_runs + 1 ))
    stop_server "$PROXY_PID" || true
    continue
  fi
  qemu-img compare -q -f raw -F raw "$dump" "$puri" ||
    fail "run $run: a second full read of the export differs from the first"
  st=0; stop_server "$PROXY_PID" || st=$?
  [ "$st" -eq 0 ] || fail "run $run: restarted xnbd-proxy exited with status $st on SIGTERM"

  # One line per run: what the workload did and what survived.
  w=$(sed -n 's/^verify: \([0-9]*\) writes issued (\([0-9]*\) acked, \([0-9]*\) flushed, \([0-9]*\) in flight.*/\1 \2 \3 \4/p' "$TESTDIR/verify.out")
  s=$(sed -n 's/^verify: sectors: .*, \([0-9]*\) from unacked writes, \([0-9]*\) unflushed writes not kept;.*/\1 \2/p' "$TESTDIR/verify.out")
  read -r nw na nf ni <<<"$w"
  read -r su sl <<<"$s"
  note=
  [ "$load_done_before" = no ] || note=" (the workload had ended before the crash)"
  printf 'run %2d/%d: crash at %4d ms: %4d writes (%4d acked, %4d flushed, %d in flight); %5d blocks present after restart; sectors from unacked writes %d, unflushed lost %d: OK%s\n' \
    "$run" "$runs" "$delay_ms" "$nw" "$na" "$nf" "$ni" "$present" "$su" "$sl" "$note"
  total_writes=$(( total_writes + nw ))
  total_acked=$(( total_acked + na ))
  total_flushed=$(( total_flushed + nf ))
  total_unacked_landed=$(( total_unacked_landed + su ))
  rm -f "$log1" "$log2"
  assert_alive "$source_pid"
done

[ "$(sha "$img")" = "$img_sha" ] || fail "I6: the source image changed"
echo "summary: $(( runs - failed_runs )) of $runs crash runs passed; passed runs made $total_writes writes ($total_acked acked, $total_flushed flushed; $total_unacked_landed sectors of unacked writes landed) (CRASH_SEED=$seed)"
[ "$failed_runs" -eq 0 ] ||
  fail "$failed_runs of $runs runs broke I2 after a crash (MISMATCH lines above; reproduce with CRASH_SEED=$seed)"
echo OK
