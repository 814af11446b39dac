#!/usr/bin/env bash
# Thin links (issue 12, item 3): migrate.sh's xnbd:// copy and its serial
# 4 KiB misses (idle, during the copy, and from the copy's first moment) on
# links of 10 and 20 Mbit/s, where the background copy's first window and
# start-up decide what a client's read waits behind.
#
#   scripts/bench/thin.sh BUILDDIR            (as root)
#
# Environment (the rest as migrate.sh):
#   BENCH_THIN_SETTINGS  default "20ms:10mbit 20ms:20mbit 100ms:10mbit"
#   BENCH_THIN_SIZE_MIB  image size (default 64: 28 s at 10 Mbit/s)
#
# Saves the tables to BUILDDIR/bench-thin.txt, the proxy's status over time
# to BUILDDIR/thin-trace.txt.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export BENCH_NAME=thin
export BENCH_SETTINGS=${BENCH_THIN_SETTINGS:-20ms:10mbit 20ms:20mbit 100ms:10mbit}
export BENCH_SIZE_MIB=${BENCH_THIN_SIZE_MIB:-64}
export BENCH_RUNS="xnbd-zstd lat"
unset BENCH_QUICK
exec "$here/migrate.sh" "$@"
