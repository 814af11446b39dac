#!/usr/bin/env bash
# Local I/O benchmark of NBD servers: xnbd-server against the servers a user
# would pick instead (qemu-nbd, nbdkit's file plugin), same image, same
# client (fio's nbd engine over a unix socket), one after the other.
#
#   scripts/bench/server-io.sh BUILDDIR
#
# Environment:
#   BENCH_SECONDS   run time of each workload (default 15; 3 for a smoke run)
#   BENCH_SIZE_MIB  image size (default 1024)
#   BENCH_TMPDIR    where the image goes (default $TMPDIR or /tmp)
#
# Prints a table (IOPS and MB/s per server, and xnbd's ratio to the best
# peer) and saves it to BUILDDIR/bench-server-io.txt.  A benchmark, not a
# test: it fails only when it cannot run; a server that fails a workload is
# shown as FAIL in the table and its log is printed.
#
# Sourced (". server-io.sh") it only defines its functions (start_server,
# stop_server, run_fio, run_workloads, print_io_table and WORKLOADS), for
# other benchmarks such as proxy.sh; see "Library" below.
set -euo pipefail

# ---------------------------------------------------------------- Library
# Callers set: ME (name for messages), tmp (scratch directory), sock (the
# unix socket servers listen on), SECONDS_PER, XNBD (xnbd-server binary) and,
# for start_server, img (the image).  stop_server/start_server keep the
# running server in server_pid and server_name.

# Workloads: name, fio rw, block size, iodepth.
WORKLOADS=(
    "randread-4k  randread  4k 32"
    "randwrite-4k randwrite 4k 32"
    "seqread-1m   read      1m 32"
    "seqwrite-1m  write     1m 32"
)
ME=${ME:-server-io.sh}
server_pid=
server_name=

stop_server() {
    [[ -n $server_pid ]] || return 0
    if kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$server_pid" 2>/dev/null; then
            echo "$ME: $server_name (pid $server_pid) ignored SIGTERM for 10 s; killing it" >&2
            kill -KILL "$server_pid" 2>/dev/null || true
        fi
    fi
    local status=0
    wait "$server_pid" 2>/dev/null || status=$?
    if (( status != 0 )); then
        echo "$ME: $server_name (pid $server_pid) exited with status $status" >&2
    fi
    server_pid=
}

# start_server NAME [ARGS...]: starts server NAME on $sock serving $img
# (xnbd-server, qemu-nbd, nbdkit-file), or, for any other NAME, runs ARGS as
# the server (the command must write its PID to $tmp/NAME.pid once ready and
# listen on $sock).  Waits until it is ready (10 s at most).
start_server() {
    server_name=$1
    shift
    local log=$tmp/$server_name.log pidfile=$tmp/$server_name.pid
    rm -f "$sock" "$pidfile"
    case $server_name in
        xnbd-server)
            "$XNBD" --unix "$sock" --pidfile "$pidfile" "$img" >"$log" 2>&1 &
            ;;
        qemu-nbd)
            qemu-nbd -f raw --persistent --shared=8 --cache=writeback --aio=threads \
                --socket="$sock" --pid-file="$pidfile" "$img" >"$log" 2>&1 &
            ;;
        nbdkit-file)
            nbdkit -f -U "$sock" --pidfile "$pidfile" file "$img" >"$log" 2>&1 &
            ;;
        *)
            "$@" >"$log" 2>&1 &
            ;;
    esac
    server_pid=$!
    for _ in $(seq 100); do
        [[ -s $pidfile && -S $sock ]] && return 0
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    echo "$ME: $server_name did not become ready (pid file and socket) within 10 s; its log:" >&2
    sed 's/^/    /' "$log" >&2
    stop_server
    return 1
}

# Runs one workload; prints "IOPS BYTES_PER_SEC" or "FAIL".
run_fio() {
    local name=$1 rw=$2 bs=$3 depth=$4 json=$tmp/$server_name-$1.json
    if ! timeout $((SECONDS_PER + 60)) fio --name="$name" --ioengine=nbd \
            --uri="nbd+unix:///?socket=$sock" --rw="$rw" --bs="$bs" \
            --iodepth="$depth" --time_based --runtime="$SECONDS_PER" \
            --output-format=json --output="$json" >"$json.stdout" 2>&1; then
        echo "$ME: fio $name against $server_name failed:" >&2
        sed 's/^/    /' "$json.stdout" >&2
        echo FAIL
        return 0
    fi
    python3 - "$json" "$rw" <<'PY' || echo FAIL
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
side = job["write" if "write" in sys.argv[2] else "read"]
if job["error"] or side["io_bytes"] == 0:
    sys.exit("fio job error %d, %d bytes moved" % (job["error"], side["io_bytes"]))
print("%.0f %.0f" % (side["iops"], side["bw_bytes"]))
PY
}

# run_workloads SERVER SYNCFILE: every workload against the running server
# (started by the caller) into RESULT[SERVER,WORKLOAD]; stops the server.
# SYNCFILE is synced before each run.
declare -A RESULT
run_workloads() {
    local server=$1 syncfile=$2 w name rw bs depth
    for w in "${WORKLOADS[@]}"; do
        read -r name rw bs depth <<< "$w"
        if ! kill -0 "$server_pid" 2>/dev/null; then
            RESULT[$server,$name]=FAIL
            continue
        fi
        # Start each run without the previous run's dirty pages in flight.
        sync "$syncfile"
        RESULT[$server,$name]=$(run_fio "$name" "$rw" "$bs" "$depth")
        printf '  %-13s %s\n' "$name" "${RESULT[$server,$name]}"
        if ! kill -0 "$server_pid" 2>/dev/null; then
            echo "$ME: $server died during $name; its log:" >&2
            sed 's/^/    /' "$tmp/$server.log" >&2
        fi
    done
    stop_server
}

# fail_workloads SERVER: marks every workload of SERVER as FAIL.
fail_workloads() {
    local w name
    for w in "${WORKLOADS[@]}"; do read -r name _ <<< "$w"; RESULT[$1,$name]=FAIL; done
}

# print_io_table SUBJECT RATIO_HEADER SERVER...: the IOPS/MB/s table of
# RESULT, with SUBJECT's IOPS divided by the best other server's.
print_io_table() {
    local subject=$1 ratio_header=$2 w name rw bs depth best server r iops bw x
    shift 2
    printf '%-14s' workload
    for server in "$@"; do printf ' | %-18s' "$server"; done
    printf ' | %s\n' "$ratio_header"
    printf '%-14s' ""
    for _ in "$@"; do printf ' | %8s %9s' IOPS MB/s; done
    printf ' |\n'
    for w in "${WORKLOADS[@]}"; do
        read -r name rw bs depth <<< "$w"
        printf '%-14s' "$name"
        best=0
        for server in "$@"; do
            r=${RESULT[$server,$name]}
            if [[ $r == FAIL ]]; then
                printf ' | %8s %9s' FAIL -
            else
                read -r iops bw <<< "$r"
                printf ' | %8s %9s' "$iops" "$(awk -v b="$bw" 'BEGIN { printf "%.1f", b / 1e6 }')"
                if [[ $server != "$subject" ]] && (( iops > best )); then best=$iops; fi
            fi
        done
        x=${RESULT[$subject,$name]}
        if [[ $x == FAIL || $best -eq 0 ]]; then
            printf ' | %s\n' -
        else
            printf ' | %.2f\n' "$(awk -v a="${x%% *}" -v b="$best" 'BEGIN { print a / b }')"
        fi
    done
}

# ------------------------------------------------- Shared by every bench script
# bench_init ME ARGS...: the one argument is BUILDDIR; goes to the
# repository root and sets ME, BUILDDIR, XNBD, PROXY.
bench_init() {
    ME=$1; shift
    [[ $# -eq 1 ]] || { echo "usage: $ME BUILDDIR" >&2; exit 1; }
    cd "$(dirname "${BASH_SOURCE[0]}")/../.."
    BUILDDIR=$(cd "$1" && pwd) || { echo "$ME: no such build directory: $1" >&2; exit 1; }
    XNBD=$BUILDDIR/xnbd-server
    # shellcheck disable=SC2034  # for proxy.sh and migrate.sh
    PROXY=$BUILDDIR/xnbd-proxy
    # BENCH_FRONTEND=nbdkit: the same engine behind nbdkit's front end.
    if [[ ${BENCH_FRONTEND:-proxy} == nbdkit ]]; then
        local wrap="$BUILDDIR/proxy-via-nbdkit"
        printf '#!/bin/sh\nexec %q %q "$@"\n' "$PWD/scripts/bench/proxy-via-nbdkit" "$BUILDDIR" > "$wrap"
        chmod +x "$wrap"
        PROXY=$wrap
    fi
}
die() { echo "$ME: $*" >&2; exit 1; }

# bench_tmpdir NAME: makes the scratch directory $tmp; on exit (also on
# INT/TERM) runs the caller's bench_cleanup_extra, if defined, then
# removes $tmp.
tmp=
bench_cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    declare -F bench_cleanup_extra >/dev/null && bench_cleanup_extra
    [[ -n $tmp && -d $tmp ]] && rm -rf "$tmp"
    exit "$rc"
}
bench_tmpdir() {
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    tmp=$(mktemp -d "${BENCH_TMPDIR:-${TMPDIR:-/tmp}}/xnbd-bench-$1.XXXXXX")
}

# Sourced: the functions are all the caller wants.
if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
    return 0
fi

# ---------------------------------------------------------------- Main
bench_init server-io.sh "$@"
SECONDS_PER=${BENCH_SECONDS:-15}
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
OUT=$BUILDDIR/bench-server-io.txt

[[ $SECONDS_PER =~ ^[1-9][0-9]*$ ]] || die "BENCH_SECONDS must be a positive integer, not '$SECONDS_PER'"
[[ $SIZE_MIB =~ ^[1-9][0-9]*$ ]] || die "BENCH_SIZE_MIB must be a positive integer, not '$SIZE_MIB'"
[[ -x $XNBD ]] || die "$XNBD not found; run 'make' first"
for tool in fio qemu-nbd nbdkit python3; do
    command -v "$tool" >/dev/null || die "$tool not found; run scripts/install-deps.sh"
done
fio --enghelp=nbd >/dev/null 2>&1 ||
    die "this fio has no nbd engine (fio --enghelp=nbd failed); Debian's fio >= 3.20 has it"
nbdkit file --version >/dev/null 2>&1 || die "nbdkit's file plugin is missing"

bench_cleanup_extra() { stop_server; }
bench_tmpdir server-io
img=$tmp/disk.img
sock=$tmp/nbd.sock

echo "server-io: writing a ${SIZE_MIB} MiB image (random data, fully allocated) in $tmp"
dd if=/dev/urandom of="$img" bs=1M count="$SIZE_MIB" status=none conv=fsync

SERVERS=(xnbd-server qemu-nbd nbdkit-file)

for server in "${SERVERS[@]}"; do
    echo "server-io: $server"
    if ! start_server "$server"; then
        fail_workloads "$server"
        continue
    fi
    run_workloads "$server" "$img"
done

{
    echo "NBD server local I/O: fio $(fio --version | sed 's/^fio-//') --ioengine=nbd over a unix socket, one connection"
    echo "image ${SIZE_MIB} MiB raw (page-cached), ${SECONDS_PER} s per workload, $(nproc) CPUs, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "qemu-nbd: -f raw --persistent --shared=8 --cache=writeback --aio=threads; nbdkit $(nbdkit --version | awk '{print $2}'): file plugin"
    echo "ratio = xnbd-server IOPS / best peer IOPS (>1.00: xnbd is faster)"
    echo
    print_io_table xnbd-server xnbd/best "${SERVERS[@]}"
    echo "(workloads: 4k = 4 KiB random, 1m = 1 MiB sequential; iodepth 32 each)"
} | tee "$OUT"
echo "server-io: table saved to $OUT"
