#!/usr/bin/env bash
# run-tests.sh BUILDDIR [unit|e2e|all]
#
# Runs every Criterion unit-test binary BUILDDIR/tests/unit-* and every
# end-to-end script tests/test-*.sh, each under `timeout 300`, with
# XNBD_BUILD exported as the absolute BUILDDIR.  Output goes to
# BUILDDIR/test-logs/NAME.log and is shown when a test fails.  Exit status 77
# means skipped.  Prints one line per test and then "N passed, N failed,
# N skipped"; exits non-zero if a test failed or if no test ran.
#
# Environment:
#   TESTS=GLOB      run only tests whose name (e.g. test-server-cli,
#                   unit-proto) matches GLOB
#   TEST_TIMEOUT=S  per-test limit in seconds (default 300)
#   TEST_JOBS=N     run up to N tests at once (default 3: most tests wait
#                   on sockets and rate-capped copies; on this project's
#                   2-core VM the plain build's e2e tests took 6.6 min with
#                   3, 8.6 with 2).  Tests that use
#                   network namespaces or boot VMs (SERIAL_TESTS below) run
#                   alone, before the others; the longest start next, then
#                   the unit tests, then the rest.  Output lines come in completion order; the
#                   logs of failed tests are shown at the end.
#
# The engine tests (ENGINE_TESTS below: invariants, restart, source loss,
# detach, zero skip, clients) run twice: with xnbd-proxy, and as NAME@nbdkit with
# XNBD_FRONTEND=nbdkit, the same engine behind the nbdkit plugin (see
# start_proxy in functions.sh).  TESTS='*@nbdkit' selects only those.

set -u -o pipefail

usage () {
  echo "usage: $0 BUILDDIR [unit|e2e|all]" >&2
  exit 2
}

[ $# -ge 1 ] && [ $# -le 2 ] || usage
mode=${2:-all}
case "$mode" in unit|e2e|all) ;; *) usage ;; esac

srcdir=$(cd "$(dirname "$0")" && pwd)
builddir=$(cd "$1" 2>/dev/null && pwd) || {
  echo "$0: build directory '$1' does not exist (run make first)" >&2
  exit 2
}
export XNBD_BUILD=$builddir
# Criterion's runner process leaks a few bytes when tests run in parallel;
# that is not ours (leaks in the test processes themselves still show).
export LSAN_OPTIONS=suppressions=$(cd "$(dirname "$0")" && pwd)/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}
logdir=$builddir/test-logs
mkdir -p "$logdir"
# Tests run from the source tests/ directory.
cd "$srcdir" || exit 2
timeout_s=${TEST_TIMEOUT:-300}
filter=${TESTS:-*}

jobs_max=${TEST_JOBS:-3}
case $jobs_max in ''|*[!0-9]*|0) echo "$0: TEST_JOBS must be a positive number" >&2; exit 2 ;; esac
# Alone: they make network namespaces with fixed names, or boot VMs
# (TCG is CPU-bound).
SERIAL_TESTS=" test-wan-emu test-wan-emu-netem test-vm-migrate test-vm-migrate-faults "
resdir=$logdir/results
rm -rf "$resdir"
mkdir -p "$resdir"
running=0

selected () {
  # shellcheck disable=SC2053  # the filter is a glob on purpose
  [[ $1 == $filter || $1.sh == $filter ]]
}

# Runs one test; prints its line and leaves "STATUS NAME" in $resdir.
run_test () {
  local name=$1; shift
  local log=$logdir/$name.log start end st=0 secs
  start=$(date +%s.%N)
  timeout --kill-after=10 "$timeout_s" "$@" >"$log" 2>&1 </dev/null || st=$?
  end=$(date +%s.%N)
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  case $st in
    0)
      echo "PASS $name" >"$resdir/$name"
      printf 'PASS  %-40s %6ss\n' "$name" "$secs" ;;
    77)
      echo "SKIP $name" >"$resdir/$name"
      printf 'SKIP  %-40s %6ss  %s\n' "$name" "$secs" \
        "$(grep -m1 '^SKIP' "$log" | cut -c7- || true)" ;;
    *)
      local why="exit status $st"
      [ "$st" -eq 124 ] || [ "$st" -eq 137 ] && why="timed out after ${timeout_s}s"
      echo "FAIL $name" >"$resdir/$name"
      printf 'FAIL  %-40s %6ss  (%s)\n' "$name" "$secs" "$why" ;;
  esac
}

# Waits until fewer than $1 tests run.
drain () {
  while [ "$running" -ge "$1" ]; do
    wait -n 2>/dev/null || true
    running=$((running - 1))
  done
}

is_serial () { [[ $SERIAL_TESTS == *" ${1%@*} "* ]]; }

run_one () {
  if is_serial "$1"; then
    drain 1
    run_test "$@"
    return
  fi
  drain "$jobs_max"
  run_test "$@" &
  running=$((running + 1))
}

ENGINE_TESTS=(test-proxy-inv-i1-i3 test-proxy-inv-i3-bg test-proxy-restart-resume
              test-proxy-source-loss test-proxy-detach test-proxy-zero-skip
              test-proxy-crash-i2 test-proxy-complete-zeros
              test-proxy-clients-xnbd-server test-proxy-dedup test-proxy-nbdfuse
              test-proxy-prepage test-proxy-read-map test-proxy-dedup-late-digests)

# The order tests start in: the ones that run alone first (one wait for
# the others to finish, at the start, where none runs), then the longest
# (20-45 s each here: started last, one of them kept two slots idle), then
# the unit tests, then the rest by name.  Every selected test runs once.
LONG_TESTS=" test-proxy-badsource-violations test-proxy-powerloss-i2 test-proxy-crash-i2
             test-proxy-read-map test-proxy-read-map@nbdkit test-proxy-dedup
             test-proxy-dedup@nbdkit test-proxy-crash-i2@nbdkit test-proxy-identity
             test-wan-reconnect test-proxy-dedup-i2 test-proxy-badsource-stall "
LONG_TESTS=" $(echo $LONG_TESTS) "    # one space between names
e2e_names=() e2e_fes=()          # each e2e test: its name, its front end
if [ "$mode" = e2e ] || [ "$mode" = all ]; then
  for script in "$srcdir"/test-*.sh; do
    [ -f "$script" ] || continue
    name=$(basename "$script" .sh)
    selected "$name" || continue
    e2e_names+=("$name") e2e_fes+=(proxy)
  done
  # ENGINE_VIA_NBDKIT=0 skips the second front end (make check's sanitizer
  # pass does: test-plugin-dedup still runs the plugin under ASan there).
  # The crash test runs fewer crashes through nbdkit: same engine.
  if [ -f "$builddir/plugins/nbdkit-dedup-plugin.so" ] && [ "${ENGINE_VIA_NBDKIT:-1}" = 1 ]; then
    for name in "${ENGINE_TESTS[@]}"; do
      selected "$name@nbdkit" || continue
      e2e_names+=("$name@nbdkit") e2e_fes+=(nbdkit)
    done
  fi
fi
run_e2e () {   # NAME FRONTEND
  if [ "$2" = nbdkit ]; then
    run_one "$1" env XNBD_FRONTEND=nbdkit CRASH_RUNS="${CRASH_RUNS:-10}" \
      bash "$srcdir/${1%@nbdkit}.sh"
  else
    run_one "$1" env XNBD_FRONTEND=proxy bash "$srcdir/$1.sh"
  fi
}
for pass in serial long unit rest; do
  if [ "$pass" = unit ]; then
    if [ "$mode" = unit ] || [ "$mode" = all ]; then
      for bin in "$builddir"/tests/unit-*; do
        [ -f "$bin" ] && [ -x "$bin" ] || continue
        name=${bin##*/}
        selected "$name" || continue
        run_one "$name" "$bin" --full-stats
      done
    fi
    continue
  fi
  for i in "${!e2e_names[@]}"; do
    name=${e2e_names[i]} fe=${e2e_fes[i]}
    kind=rest
    if is_serial "$name"; then kind=serial
    elif [[ $LONG_TESTS == *" $name "* ]]; then kind=long
    fi
    [ "$kind" = "$pass" ] || continue
    run_e2e "$name" "$fe"
  done
done

drain 1
passed=0 failed=0 skipped=0
failed_names=()
for f in "$resdir"/*; do
  [ -f "$f" ] || continue
  read -r st name <"$f"
  case $st in
    PASS) passed=$((passed + 1)) ;;
    SKIP) skipped=$((skipped + 1)) ;;
    *) failed=$((failed + 1)); failed_names+=("$name") ;;
  esac
done
for name in "${failed_names[@]}"; do
  echo "----- $logdir/$name.log (last 100 lines) -----"
  tail -n 100 "$logdir/$name.log"
  echo "----- end of $name -----"
done
# The lines that say why, again, last: a CI report may keep only the end.
for name in "${failed_names[@]}"; do
  echo "----- why $name failed -----"
  grep -E '^\[(----|FAIL)\]|Assertion|^FAIL|not ok|ERROR: AddressSanitizer|runtime error|LeakSanitizer|timed out' \
    "$logdir/$name.log" | head -n 30
done
total=$((passed + failed + skipped))
echo "$passed passed, $failed failed, $skipped skipped"
if [ "$failed" -gt 0 ]; then
  echo "failed: ${failed_names[*]} (logs in $logdir)"
  exit 1
fi
if [ "$total" -eq 0 ]; then
  echo "no tests ran (mode $mode, TESTS=${TESTS:-unset})" >&2
  exit 1
fi
exit 0
