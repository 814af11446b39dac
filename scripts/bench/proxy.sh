#!/usr/bin/env bash
# xnbd-proxy benchmarks on one machine (no WAN emulation):
#
#   (b) migration copy: time for `xnbd-proxy --cache-all` to make a complete
#       cache of a generated image (scripts/bench/gen-image.py: 40% random,
#       30% zero, 30% text blocks) from xnbd-server, against `nbdcopy` of the
#       same image from the same server to a file; over a unix socket, TCP on
#       127.0.0.1, and (proxy only) the xnbd:// WAN transport (zstd) on
#       127.0.0.1.  Each run BENCH_REPEAT times, median shown.  Target:
#       proxy time <= 1.1 x nbdcopy's.
#   (a) local I/O through a complete proxy (no source): the four fio
#       workloads of server-io.sh against that proxy, xnbd-server and
#       qemu-nbd, each serving its own copy of the image.  Target: proxy
#       IOPS >= 0.9 x the best peer's.
#
#   scripts/bench/proxy.sh BUILDDIR
#
# Environment:
#   BENCH_SECONDS   run time of each fio workload (default 15)
#   BENCH_SIZE_MIB  image size (default 1024)
#   BENCH_REPEAT    runs of each copy, median shown (default 3)
#   BENCH_IO_REPEAT rounds of the fio workloads, median shown (default 3)
#   BENCH_SEED      gen-image.py seed (default 1)
#   BENCH_PARTS     "a b" (default), "a" (only one proxy copy, to have a
#                   complete cache, then the fio runs) or "b"
#   BENCH_TMPDIR    where images and caches go (default $TMPDIR or /tmp)
#
# Saves the tables to BUILDDIR/bench-proxy.txt.  A benchmark, not a test: it
# fails only when it cannot run; a run that fails shows as FAIL.
#
# Sourced (". proxy.sh") it only defines its helpers (after sourcing
# server-io.sh's): proxy_wait_complete, median, and the variables it needs.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=server-io.sh
. "$BENCH_DIR/server-io.sh"

# proxy_wait_complete CTL START_NS TIMEOUT_S STATUSFILE [SAMPLEFILE]
#   START_NS may be @FILE: the poller starts first, creates FILE.ready, and
#   reads the start time from FILE once it appears (so that its own start,
#   tens of ms of Python on a busy CPU, is not inside the timed copy).
#   Polls the proxy's control socket CTL (status every 10 ms over one
#   connection, waiting for the socket to appear) until "state" is complete
#   or detached; prints the seconds since START_NS (date +%s%N) at which the
#   proxy recorded that every block was present (status completed_at; when
#   first seen for a proxy that does not report it), and writes the last
#   status JSON to STATUSFILE.  With
#   SAMPLEFILE, appends "t_s fetched fetch_rate window rtt_us inflight" every
#   0.5 s for diagnosis.  Fails after TIMEOUT_S seconds (prints TIMEOUT) or
#   if the proxy reports an error state.
proxy_wait_complete() {
    python3 - "$@" <<'PY'
import json, socket, sys, time
ctl, start_arg, timeout, statusfile = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
if start_arg.startswith("@"):
    open(start_arg[1:] + ".ready", "w").close()
    wait_until = time.monotonic() + 60
    while True:
        try:
            start_ns = int(open(start_arg[1:]).read())
            break
        except (OSError, ValueError):
            if time.monotonic() > wait_until:
                print("FAIL"); sys.exit(1)
            time.sleep(0.001)
else:
    start_ns = int(start_arg)
samplefile = sys.argv[5] if len(sys.argv) > 5 else None
deadline = time.monotonic() + timeout
def fail(why, j=None):
    if j is not None:
        open(statusfile, "w").write(json.dumps(j) + "\n")
    print("TIMEOUT" if why == "timeout" else "FAIL")
    sys.stderr.write("proxy_wait_complete: %s\n" % why)
    sys.exit(1)
s = None
while s is None:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(ctl)
    except OSError:
        s.close()
        s = None
        if time.monotonic() > deadline:
            fail("timeout")
        time.sleep(0.005)
s.settimeout(30)
f = s.makefile("rwb")
samples = open(samplefile, "a") if samplefile else None
next_sample = 0.0
j = None
while True:
    try:
        f.write(b"status\n")
        f.flush()
        line = f.readline()
    except OSError as e:
        fail("control socket: %s" % e, j)
    now_ns = time.time_ns()
    if not line:
        fail("the proxy closed its control socket", j)
    j = json.loads(line)
    if not j.get("ok"):
        fail("status failed: %s" % j.get("error"), j)
    t = (now_ns - start_ns) / 1e9
    if samples and t >= next_sample:
        samples.write("%.2f %d %d %d %s %d\n" % (
            t, j["bytes"]["fetched"], j.get("fetch_rate", 0),
            j.get("background", {}).get("window", 0), j.get("rtt_us", "-"),
            j["blocks"]["inflight"]))
        samples.flush()
        next_sample = t + 0.5
    if j.get("state") in ("complete", "detached"):
        open(statusfile, "w").write(json.dumps(j) + "\n")
        if "completed_at" in j:     # the proxy's own clock, not this poll's
            t = j["completed_at"] - start_ns / 1e9
        print("%.3f" % t)
        sys.exit(0)
    if j.get("state") in ("failed", "error"):
        fail("proxy state %s: %s" % (j["state"], j.get("last_error")), j)
    if time.monotonic() > deadline:
        fail("timeout", j)
    # The time comes from the proxy's own completed_at: polling faster
    # would only take CPU (and the engine's lock) from what is measured.
    time.sleep(0.05)
PY
}

# median V...: the median of numbers (FAIL/TIMEOUT entries make it FAIL).
median() {
    printf '%s\n' "$@" | python3 -c '
import sys
v = sys.stdin.read().split()
try:
    x = sorted(float(a) for a in v)
    print("%.3f" % x[len(x) // 2] if len(x) % 2 else "%.3f" % ((x[len(x)//2 - 1] + x[len(x)//2]) / 2))
except ValueError:
    print("FAIL")'
}

# status_get FILE KEY.KEY...: one member of a saved status, or "-".
status_get() {
    python3 -c '
import json, sys
try:
    j = json.load(open(sys.argv[1]))
    for k in sys.argv[2].split("."):
        j = j[k]
    print(j)
except Exception:
    print("-")' "$1" "$2"
}

# status_summary FILE: one line of the interesting members of a saved status.
status_summary() {
    python3 -c '
import json, sys
try:
    j = json.load(open(sys.argv[1]))
except Exception as e:
    print("no status (%s)" % e); sys.exit(0)
b = j.get("bytes", {})
out = ["fetched %s B" % b.get("fetched", "-"), "zero-skipped %s B" % b.get("zero_skipped", "-"),
       "fetches %s" % j.get("fetches", {}).get("background", "-"),
       "bg window %s B" % j.get("background", {}).get("window", "-"),
       "rtt_us %s" % j.get("rtt_us", "-")]
w = j.get("wire")
if isinstance(w, dict) and w.get("rx_raw"):
    out.append("wire rx %d B for %d B of NBD (%.3f)" % (w["rx"], w["rx_raw"], w["rx"] / w["rx_raw"]))
elif isinstance(w, dict):
    out.append("wire not compressed")
else:
    out.append("no wire counters in status")
print(", ".join(out))' "$1"
}

# warm FILE...: reads FILEs so that they are in the page cache.  This
# machine's kernel pages out memory that has not been touched for a while
# (DAMON proactive reclaim), so an image idle for a minute may have left
# the page cache; the benchmarks measure servers and copies, not the disk.
warm() {
    local f
    for f in "$@"; do
        [[ -f $f ]] && dd if="$f" of=/dev/null bs=4M status=none
    done
    return 0
}

# kill_pid PID NAME: SIGTERM, wait up to 10 s, then SIGKILL; reaps it.
kill_pid() {
    local pid=$1 name=$2
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "$ME: $name (pid $pid) ignored SIGTERM for 10 s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
    return 0
fi

# ---------------------------------------------------------------- Main
bench_init proxy.sh "$@"
SECONDS_PER=${BENCH_SECONDS:-15}
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
REPEAT=${BENCH_REPEAT:-3}
IO_REPEAT=${BENCH_IO_REPEAT:-3}
SEED=${BENCH_SEED:-1}
PARTS=${BENCH_PARTS:-a b}
OUT=$BUILDDIR/bench-proxy.txt
part() { [[ " $PARTS " == *" $1 "* ]]; }

for v in SECONDS_PER SIZE_MIB REPEAT IO_REPEAT; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done
[[ $SEED =~ ^[0-9]+$ ]] || die "BENCH_SEED must be a non-negative integer, not '$SEED'"
[[ -x $XNBD ]] || die "$XNBD not found; run 'make' first"
[[ -x $PROXY ]] || die "$PROXY not found; run 'make' first"
for tool in fio qemu-nbd nbdcopy python3; do
    command -v "$tool" >/dev/null || die "$tool not found; run scripts/install-deps.sh"
done
fio --enghelp=nbd >/dev/null 2>&1 ||
    die "this fio has no nbd engine (fio --enghelp=nbd failed); Debian's fio >= 3.20 has it"

src_pid=
copy_pid=
bench_cleanup_extra() {
    stop_server
    declare -F stop_io_servers >/dev/null && stop_io_servers
    kill_pid "$copy_pid" "copy"
    kill_pid "$src_pid" "source xnbd-server"
}
bench_tmpdir proxy
pristine=$tmp/source.img
sock=$tmp/nbd.sock
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

echo "proxy: generating a ${SIZE_MIB} MiB image (seed $SEED) in $tmp"
python3 "$BENCH_DIR/gen-image.py" "$SIZE_MIB" "$pristine" "$SEED"
sync "$pristine"
nonzero=$(python3 - "$pristine" <<'PY'
import sys
z = bytes(4096)
n = 0
with open(sys.argv[1], "rb", buffering=0) as f:
    while True:
        b = f.read(1 << 22)
        if not b:
            break
        for i in range(0, len(b), 4096):
            blk = b[i:i + 4096]
            if blk != z[:len(blk)]:
                n += len(blk)
print(n)
PY
)

# ---------------------------------------------------------------- (b)
# One read-only source server for every copy: unix socket, TCP, WAN port.
src_sock=$tmp/src.sock
"$XNBD" -r -u "$src_sock" -l 127.0.0.1:0 --port-file "$tmp/src.port" \
    -W 127.0.0.1:0 --wan-port-file "$tmp/src.wanport" -p "$tmp/src.pid" \
    "$pristine" >"$tmp/src.log" 2>&1 &
src_pid=$!
for _ in $(seq 100); do
    [[ -s $tmp/src.pid && -s $tmp/src.port && -s $tmp/src.wanport && -S $src_sock ]] && break
    kill -0 "$src_pid" 2>/dev/null || break
    sleep 0.1
done
[[ -s $tmp/src.pid && -s $tmp/src.wanport ]] || {
    sed 's/^/    /' "$tmp/src.log" >&2; die "the source xnbd-server did not start"; }
port=$(cat "$tmp/src.port")
wanport=$(cat "$tmp/src.wanport")

# Copies: name, tool, source URI.
COPIES=(
    "proxy-unix   proxy   nbd+unix:///?socket=$src_sock"
    "nbdcopy-unix nbdcopy nbd+unix:///?socket=$src_sock"
    "proxy-tcp    proxy   nbd://127.0.0.1:$port/"
    "nbdcopy-tcp  nbdcopy nbd://127.0.0.1:$port/"
    "proxy-xnbd   proxy   xnbd://127.0.0.1:$wanport/"
)
COPY_TIMEOUT=$(( 120 + SIZE_MIB / 4 ))
declare -A TIMES

# copy_once NAME TOOL URI: one timed copy; sets copy_t to the seconds it
# took, or to FAIL/TIMEOUT.
copy_t=
copy_once() {
    local name=$1 tool=$2 uri=$3 t0 t1 rc=0 dst=$tmp/copy-$1.img
    rm -f "$dst" "$tmp/$name.bm" "$tmp/$name.ctl" "$tmp/$name.sock" "$tmp/$name.pid"
    if [[ $tool == nbdcopy ]]; then
        t0=$(date +%s%N)
        timeout "$COPY_TIMEOUT" nbdcopy "$uri" "$dst" >"$tmp/$name.log" 2>&1 || rc=$?
        t1=$(date +%s%N)
        if (( rc )); then
            echo "$ME: nbdcopy $uri failed (status $rc):" >&2
            sed 's/^/    /' "$tmp/$name.log" >&2
            copy_t=FAIL
        else
            copy_t=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
        fi
        return 0
    fi
    t0=$(date +%s%N)
    "$PROXY" --target "$uri" --cache "$dst" --bitmap "$tmp/$name.bm" \
        --control "$tmp/$name.ctl" -u "$tmp/$name.sock" -p "$tmp/$name.pid" \
        --cache-all >"$tmp/$name.log" 2>&1 &
    copy_pid=$!
    if ! copy_t=$(proxy_wait_complete "$tmp/$name.ctl" "$t0" "$COPY_TIMEOUT" "$tmp/$name.status"); then
        echo "$ME: $name did not complete; its log:" >&2
        sed 's/^/    /' "$tmp/$name.log" >&2
        [[ -n $copy_t ]] || copy_t=FAIL
    fi
    kill_pid "$copy_pid" "$name"
    copy_pid=
}

if ! part b; then
    COPIES=("${COPIES[0]}")         # proxy-unix: the complete cache for (a)
    REPEAT=1
fi
for r in $(seq "$REPEAT"); do
    for c in "${COPIES[@]}"; do
        read -r name tool uri <<< "$c"
        warm "$pristine"
        copy_once "$name" "$tool" "$uri"
        TIMES[$name]="${TIMES[$name]-} $copy_t"
        printf 'proxy: copy run %d/%d %-13s %s s\n' "$r" "$REPEAT" "$name" "$copy_t"
    done
done
kill_pid "$src_pid" "source xnbd-server"
src_pid=

verify="not checked"
if [[ -f $tmp/copy-proxy-unix.img ]]; then
    if cmp -s "$pristine" "$tmp/copy-proxy-unix.img"; then verify="identical to the image"
    else verify="DIFFERS from the image"; fi
fi

# ---------------------------------------------------------------- (a)
# The complete cache of the last proxy-unix copy, served by a proxy without
# a source; xnbd-server and qemu-nbd each get their own copy of the image
# (fio's writes fill holes, so no server sees another's allocations).  All
# three run at once (idle ones cost nothing), each on its own socket; each
# round runs every workload against every server in turn, so a change in
# the machine's load hits all three alike; the median of IO_REPEAT rounds
# (by IOPS) is shown.
complete_ok=0
if [[ $(status_get "$tmp/proxy-unix.status" state) == complete ]]; then complete_ok=1; fi
IO_SERVERS=(xnbd-proxy xnbd-server qemu-nbd)
part a || IO_SERVERS=()
declare -A IO_PID IO_SOCK IO_IMG
declare -A ROUNDS
for server in "${IO_SERVERS[@]}"; do
    sock=$tmp/io-$server.sock
    case $server in
        xnbd-proxy)
            if (( ! complete_ok )); then
                echo "$ME: no complete cache to serve (the proxy-unix copy failed)" >&2
                continue
            fi
            img=$tmp/copy-proxy-unix.img
            start_server xnbd-proxy "$PROXY" --cache "$img" --bitmap "$tmp/proxy-unix.bm" \
                --control "$tmp/io.ctl" -u "$sock" -p "$tmp/xnbd-proxy.pid" || continue
            ;;
        *)
            img=$tmp/io-$server.img
            cp --sparse=always "$pristine" "$img"
            sync "$img"
            start_server "$server" || continue
            ;;
    esac
    IO_PID[$server]=$server_pid IO_SOCK[$server]=$sock IO_IMG[$server]=$img
    server_pid=                     # several at once: tracked in IO_PID
done
stop_io_servers() {
    local s
    for s in "${!IO_PID[@]}"; do
        server_pid=${IO_PID[$s]} server_name=$s
        stop_server
        unset "IO_PID[$s]"
    done
}
for round in $(seq "$IO_REPEAT"); do
    for w in "${WORKLOADS[@]}"; do
        read -r name rw bs depth <<< "$w"
        for server in "${IO_SERVERS[@]}"; do
            r=FAIL
            if [[ -n ${IO_PID[$server]-} ]] && kill -0 "${IO_PID[$server]}" 2>/dev/null; then
                sock=${IO_SOCK[$server]} server_name=$server
                # Start each run without the previous run's dirty pages in
                # flight, and with the image in the page cache.
                sync "${IO_IMG[$server]}"
                warm "${IO_IMG[$server]}"
                r=$(run_fio "$name" "$rw" "$bs" "$depth")
                if ! kill -0 "${IO_PID[$server]}" 2>/dev/null; then
                    echo "$ME: $server died during $name; its log:" >&2
                    sed 's/^/    /' "$tmp/$server.log" >&2
                fi
            fi
            ROUNDS[$server,$name]="${ROUNDS[$server,$name]-}${ROUNDS[$server,$name]+;}$r"
            printf 'proxy: local I/O round %d/%d %-13s %-12s %s\n' "$round" "$IO_REPEAT" "$name" "$server" "$r"
        done
    done
done
stop_io_servers
# RESULT[server,workload] = the round with the median IOPS (FAIL if any failed).
for key in "${!ROUNDS[@]}"; do
    RESULT[$key]=$(python3 -c '
import sys
runs = sys.argv[1].split(";")
if any(r == "FAIL" for r in runs):
    print("FAIL")
else:
    runs.sort(key=lambda r: float(r.split()[0]))
    print(runs[len(runs) // 2])' "${ROUNDS[$key]}")
done
for server in "${IO_SERVERS[@]}"; do
    for w in "${WORKLOADS[@]}"; do
        read -r name _ <<< "$w"
        [[ -n ${RESULT[$server,$name]-} ]] || RESULT[$server,$name]=FAIL
    done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- Tables
size_bytes=$((SIZE_MIB * 1048576))
{
    echo "xnbd-proxy on one machine, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, load average before $load_before, after $load_after"
    echo "image: gen-image.py ${SIZE_MIB} MiB seed $SEED (40% random, 30% zero holes, 30% text); non-zero bytes $nonzero"
    echo
    echo "(b) full copy from xnbd-server (same server, read-only, page-cached image): proxy --cache-all until"
    echo "    status says complete, vs nbdcopy SOURCE FILE; median of $REPEAT runs; MB/s = image size / time"
    echo "    target: proxy time <= 1.10 x nbdcopy's over the same transport"
    echo
    for c in "${COPIES[@]}"; do
        read -r name _ <<< "$c"
        read -ra runs <<< "${TIMES[$name]}"
        TIMES[$name,median]=$(median "${runs[@]}")
    done
    printf '%-13s | %-28s | %8s | %8s | %-22s | %s\n' copy source "time s" "MB/s" "runs s" "vs nbdcopy"
    for c in "${COPIES[@]}"; do
        read -r name tool uri <<< "$c"
        read -ra runs <<< "${TIMES[$name]}"
        m=${TIMES[$name,median]}
        case $name in
            proxy-unix) ref=nbdcopy-unix ;;
            proxy-tcp|proxy-xnbd) ref=nbdcopy-tcp ;;
            *) ref= ;;
        esac
        ratio=-
        if [[ -n $ref && $m != FAIL && ${TIMES[$ref,median]-FAIL} != FAIL ]]; then
            ratio=$(awk -v a="$m" -v b="${TIMES[$ref,median]}" 'BEGIN { printf "%.2f", a / b }')
            ratio="$ratio (${ref})"
        fi
        mbs=-
        [[ $m == FAIL ]] || mbs=$(awk -v s="$size_bytes" -v t="$m" 'BEGIN { printf "%.0f", s / t / 1e6 }')
        case $uri in
            nbd+unix*) src="nbd+unix (unix socket)" ;;
            xnbd*) src="xnbd://127.0.0.1 (zstd 3)" ;;
            *) src="nbd://127.0.0.1 (TCP)" ;;
        esac
        printf '%-13s | %-28s | %8s | %8s | %-22s | %s\n' "$name" "$src" "$m" "$mbs" "${runs[*]}" "$ratio"
    done
    echo
    for name in proxy-unix proxy-tcp proxy-xnbd; do
        f=$tmp/$name.status
        [[ -f $f ]] || continue
        echo "$name last run: $(status_summary "$f")"
    done
    echo "proxy-unix's cache after the copy: $verify"
    echo
    if ! part a; then
        echo "(a) not run (BENCH_PARTS=$PARTS)"
    else
    echo "(a) local I/O through the complete proxy (no source), fio $(fio --version | sed 's/^fio-//') --ioengine=nbd,"
    echo "    unix socket, one connection, ${SECONDS_PER} s per workload; each server has its own copy of the image;"
    echo "    $IO_REPEAT rounds, each running every workload on every server in turn; median round (by IOPS) shown"
    echo "    qemu-nbd: -f raw --persistent --shared=8 --cache=writeback --aio=threads"
    echo "    ratio = xnbd-proxy IOPS / best peer IOPS; target >= 0.90"
    echo
    print_io_table xnbd-proxy proxy/best "${IO_SERVERS[@]}"
    echo "(workloads: 4k = 4 KiB random, 1m = 1 MiB sequential; iodepth 32 each)"
    fi
} | tee "$OUT"
echo "proxy: tables saved to $OUT"
