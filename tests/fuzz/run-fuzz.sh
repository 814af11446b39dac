#!/usr/bin/env bash
# run-fuzz.sh FUZZDIR SECONDS NAME...
#
# Runs each libFuzzer target FUZZDIR/fuzz/fuzz-NAME for SECONDS seconds,
# starting from the committed seeds tests/fuzz/corpus/NAME/ (read only) and
# the inputs earlier runs found, kept in FUZZDIR/corpus/NAME/.  A crash,
# leak, sanitizer report or hang (FUZZ_TIMEOUT seconds for one input,
# default 20) fails the target: the input is saved as
# FUZZDIR/crashes/NAME/crash-* (or leak-*, timeout-*) and the log is shown.
# Reproduce with: FUZZ_LOG=1 FUZZDIR/fuzz/fuzz-NAME FILE
#
# Prints one line per target and exits non-zero if a target failed, was
# not built, or if no target was named (never passes having run nothing).
#
# Options a target always needs (e.g. a -max_len above its seeds') are in
# tests/fuzz/fuzz-NAME.options, one line of libFuzzer options.
#
# Environment: FUZZ_TIMEOUT=S (per input), FUZZ_ARGS (more libFuzzer
# options, e.g. "-use_value_profile=1").

set -u -o pipefail

usage () {
  echo "usage: $0 FUZZDIR SECONDS NAME..." >&2
  exit 2
}
[ $# -ge 2 ] || usage
fuzzdir=$1 seconds=$2
shift 2
case $seconds in ''|*[!0-9]*) echo "$0: SECONDS must be a whole number, not '$seconds'" >&2; exit 2 ;; esac
if [ $# -eq 0 ]; then
  echo "$0: no fuzz targets named: nothing would run (are tests/fuzz/fuzz-*.c there?)" >&2
  exit 1
fi

srcdir=$(cd "$(dirname "$0")" && pwd)
timeout_s=${FUZZ_TIMEOUT:-20}
failed=0 passed=0

for name in "$@"; do
  bin=$fuzzdir/fuzz/fuzz-$name
  seeds=$srcdir/corpus/$name
  work=$fuzzdir/corpus/$name
  crashes=$fuzzdir/crashes/$name
  log=$fuzzdir/logs/fuzz-$name.log
  if [ ! -x "$bin" ]; then
    echo "FAIL  fuzz-$name: $bin was not built (run make fuzz-build)"
    failed=$((failed + 1))
    continue
  fi
  if [ ! -d "$seeds" ] || [ -z "$(ls -A "$seeds")" ]; then
    echo "FAIL  fuzz-$name: no seed corpus in $seeds"
    failed=$((failed + 1))
    continue
  fi
  opts=
  [ -f "$srcdir/fuzz-$name.options" ] && opts=$(head -n 1 "$srcdir/fuzz-$name.options")
  mkdir -p "$work" "$crashes" "$(dirname "$log")"
  start=$(date +%s)
  # New inputs go to the first directory only: the seeds stay as committed.
  # shellcheck disable=SC2086  # opts and FUZZ_ARGS are lists of options
  "$bin" -max_total_time="$seconds" -timeout="$timeout_s" \
    -artifact_prefix="$crashes/" -print_final_stats=1 $opts ${FUZZ_ARGS-} \
    "$work" "$seeds" >"$log" 2>&1 </dev/null
  st=$?
  secs=$(( $(date +%s) - start ))
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1)
  if [ $st -eq 0 ] && [ -n "$runs" ]; then
    passed=$((passed + 1))
    printf 'PASS  fuzz-%-10s %4ss  %s runs, %s\n' "$name" "$secs" "$runs" "${cov:-cov: ?}"
  else
    failed=$((failed + 1))
    printf 'FAIL  fuzz-%-10s %4ss  (exit status %s; inputs in %s)\n' "$name" "$secs" "$st" "$crashes"
    echo "----- $log (last 60 lines) -----"
    tail -n 60 "$log"
    echo "----- end of fuzz-$name -----"
  fi
done

echo "fuzz: $passed passed, $failed failed"
[ $failed -eq 0 ] && [ $passed -gt 0 ]
