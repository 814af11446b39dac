#!/usr/bin/env bash
# Local I/O through the nbdkit plugin (nbdkit dedup) against xnbd-proxy (the
# same engine behind its own front end) and nbdkit's file plugin, all on the
# same complete image: fio's nbd engine over a unix socket, 4 KiB random
# read and 1 MiB sequential read, iodepth 32, one server after the other.
#
#   scripts/bench/plugin-io.sh BUILDDIR
#
# Environment:
#   BENCH_SECONDS   run time of each workload (default 15)
#   BENCH_SIZE_MIB  image size (default 1024)
#   BENCH_TMPDIR    where the image goes (default $TMPDIR or /tmp)
#   BENCH_SERVERS   the servers, in this order (default "nbdkit-dedup
#                   xnbd-proxy nbdkit-file"; nbdkit-dedup must be one)
#
# The cache is made complete first (xnbd-proxy --cache-all from xnbd-server),
# so the engine serves it without a source, as after a migration.  Prints
# IOPS and MB/s per server and the plugin's ratio to the best other one, and
# saves the table to BUILDDIR/bench-plugin-io.txt.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=server-io.sh
. "$BENCH_DIR/server-io.sh"

bench_init plugin-io.sh "$@"
SECONDS_PER=${BENCH_SECONDS:-15}
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
OUT=$BUILDDIR/bench-plugin-io.txt
PLUGIN=$BUILDDIR/plugins/nbdkit-dedup-plugin.so
CTL=$BUILDDIR/xnbd-ctl
WORKLOADS=(
    "randread-4k  randread  4k 32"
    "seqread-1m   read      1m 32"
)

[[ $SECONDS_PER =~ ^[1-9][0-9]*$ ]] || die "BENCH_SECONDS must be a positive integer, not '$SECONDS_PER'"
[[ $SIZE_MIB =~ ^[1-9][0-9]*$ ]] || die "BENCH_SIZE_MIB must be a positive integer, not '$SIZE_MIB'"
for f in "$XNBD" "$PROXY" "$CTL" "$PLUGIN"; do [[ -e $f ]] || die "$f not found; run 'make' first"; done
for tool in fio nbdkit python3; do
    command -v "$tool" >/dev/null || die "$tool not found; run scripts/install-deps.sh"
done

bench_cleanup_extra() { stop_server; }
bench_tmpdir plugin-io
img=$tmp/disk.img
cache=$tmp/cache.img
bitmap=$tmp/cache.bitmap
ctl=$tmp/ctl
sock=$tmp/nbd.sock

echo "plugin-io: writing a ${SIZE_MIB} MiB image (random data, fully allocated) in $tmp"
dd if=/dev/urandom of="$img" bs=1M count="$SIZE_MIB" status=none conv=fsync

echo "plugin-io: making the cache complete (xnbd-proxy --cache-all from xnbd-server)"
src_sock=$tmp/src.sock
"$XNBD" -r --unix "$src_sock" --pidfile "$tmp/src.pid" "$img" >"$tmp/src.log" 2>&1 &
src_pid=$!
for _ in $(seq 100); do [[ -s $tmp/src.pid ]] && break; sleep 0.1; done
start_server fill "$PROXY" --target "nbd+unix:///?socket=$src_sock" --cache "$cache" \
    --bitmap "$bitmap" --control "$ctl" -u "$sock" --pidfile "$tmp/fill.pid" --cache-all
timeout 600 "$CTL" --control "$ctl" cache-all --wait >/dev/null || die "the copy did not complete"
stop_server
kill -TERM "$src_pid"; wait "$src_pid" || true
cmp "$img" "$cache" || die "the complete cache differs from the image"

SERVERS=(${BENCH_SERVERS:-nbdkit-dedup xnbd-proxy nbdkit-file})
for server in "${SERVERS[@]}"; do
    echo "plugin-io: $server"
    case $server in
        nbdkit-dedup)
            ok=0; start_server nbdkit-dedup nbdkit -f -U "$sock" -P "$tmp/nbdkit-dedup.pid" \
                "$PLUGIN" cache="$cache" bitmap="$bitmap" control="$ctl" || ok=$? ;;
        xnbd-proxy)
            ok=0; start_server xnbd-proxy "$PROXY" --cache "$cache" --bitmap "$bitmap" \
                --control "$ctl" -u "$sock" --pidfile "$tmp/xnbd-proxy.pid" || ok=$? ;;
        nbdkit-file)
            img=$cache; ok=0; start_server nbdkit-file || ok=$? ;;
    esac
    if (( ok != 0 )); then fail_workloads "$server"; continue; fi
    run_workloads "$server" "$cache"
done

{
    echo "Local I/O through the engine: fio $(fio --version | sed 's/^fio-//') --ioengine=nbd over a unix socket, one connection"
    echo "complete cache image ${SIZE_MIB} MiB (page-cached), ${SECONDS_PER} s per workload, $(nproc) CPUs, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "nbdkit $(nbdkit --version | awk '{print $2}'): dedup plugin (this engine) and file plugin; xnbd-proxy: defaults"
    echo "ratio = nbdkit-dedup IOPS / best other IOPS"
    echo
    print_io_table nbdkit-dedup dedup/best "${SERVERS[@]}"
} | tee "$OUT"
echo "plugin-io: table saved to $OUT"
