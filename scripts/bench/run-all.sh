#!/usr/bin/env bash
# Runs every benchmark against the build in BUILDDIR (what `make bench` runs).
#   scripts/bench/run-all.sh BUILDDIR
# BENCH_SECONDS=3 shortens each timed run for a smoke test.  Each benchmark
# saves its own table as BUILDDIR/bench-*.txt; this script also collects them
# into BUILDDIR/bench-all.txt.
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 BUILDDIR" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
builddir=$1
[[ -d $builddir ]] || { echo "run-all.sh: no such build directory: $builddir" >&2; exit 1; }

# Later issues add migration-time and WAN-bytes benchmarks here.
benches=(server-io)

failed=()
for b in "${benches[@]}"; do
    echo "=== bench: $b"
    rm -f "$builddir/bench-$b.txt"
    if ! "$here/$b.sh" "$builddir"; then
        echo "run-all.sh: benchmark $b failed" >&2
        failed+=("$b")
    fi
    echo
done

{
    for b in "${benches[@]}"; do
        f=$builddir/bench-$b.txt
        [[ -f $f ]] || continue
        echo "=== $b"
        cat "$f"
        echo
    done
} > "$builddir/bench-all.txt"
echo "run-all.sh: tables collected in $builddir/bench-all.txt"

if (( ${#failed[@]} )); then
    echo "run-all.sh: failed: ${failed[*]}" >&2
    exit 1
fi
