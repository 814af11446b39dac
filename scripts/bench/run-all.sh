#!/usr/bin/env bash
# Runs every benchmark against the build in BUILDDIR (what `make bench` runs).
#   scripts/bench/run-all.sh BUILDDIR
# BENCH_SECONDS=3 shortens each timed run for a smoke test; BENCH_QUICK=1
# shortens the WAN migration benchmark (see each script for more).  Each
# benchmark saves its own table as BUILDDIR/bench-*.txt; this script also
# collects them into BUILDDIR/bench-all.txt.
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 BUILDDIR" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
builddir=$1
[[ -d $builddir ]] || { echo "run-all.sh: no such build directory: $builddir" >&2; exit 1; }

# server-io: NBD server local I/O; proxy: xnbd-proxy copy time and local
# I/O on one machine; plugin-io: local I/O through the nbdkit plugin vs
# xnbd-proxy and nbdkit file; migrate: migration over an emulated WAN (root; long:
# BENCH_QUICK=1 runs one setting on a 256 MiB image); dedup: deduplication
# on debootstrap'd Debian images and VM RAM images over an emulated WAN
# (root; builds its data once, then keeps it in BENCH_CACHE); multi: four
# migrations from one xnbd-server sharing one emulated link (root); vm: a
# whole running VM moved over an emulated WAN, QEMU pre-copy vs xnbd
# without and with seeds (root, /dev/fuse; TCG); read-order: the disk
# regions the VM at the source read last, copied first (the server's read
# map) against the ascending copy (root).
benches=(server-io proxy plugin-io migrate thin dedup multi vm read-order)

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
