# shellcheck shell=bash
# Helpers of the WAN benchmarks (migrate.sh, dedup.sh), sourced after
# proxy.sh and bench_init: processes in the wan-emu namespaces, link byte
# counts, timed xnbd-proxy / nbdcopy / nbdkit copies and on-demand latency.
# They use these globals of the caller: WAN, WNAME, wan_up, PIDS, LAT, tmp,
# img (the source image), CAP, TRACE, SETTING_LABEL, NONZERO, LAT_N, rtt_s.

# start_bg VAR CMD...: starts CMD in the background, records its PID in
# PIDS and in VAR.
start_bg() {
    local var=$1
    shift
    "$@" &
    printf -v "$var" '%s' "$!"
    PIDS+=("$!")
}

# stop_pid PID NAME: stops a process start_bg started and forgets it (so
# that a later stop_all cannot hit a recycled PID).
stop_pid() {
    local p keep=()
    kill_pid "$1" "$2"
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

stop_all() {
    local p
    for p in "${PIDS[@]}"; do kill_pid "$p" "pid $p"; done
    PIDS=()
}

wan() { "$WAN" --name "$WNAME" "$@"; }

# wan_start RTT RATE PORTS: brings the emulated link up (dies if it cannot)
# and sets wan_up=1 and mode_line (how the delay is made).
wan_start() {
    local out
    out=$(wan up --rtt "$1" --rate "$2" --forward "$3" 2>&1) ||
        { echo "$out" >&2; die "wan-emu up failed"; }
    wan_up=1
    mode_line=$(grep -m1 '^wan-emu: mode' <<< "$out" || echo "wan-emu: mode unknown")
    mode_line=${mode_line#wan-emu: }
}

# setting_numbers RTT RATE: "RTT_SECONDS RATE_BITS_PER_SECOND" for e.g.
# 20ms 200mbit (as wan-emu takes them).
setting_numbers() {
    python3 - "$1" "$2" <<'PY'
import re, sys
m = re.fullmatch(r"([0-9.]+)(ms|us|s)?", sys.argv[1])
rtt = float(m.group(1)) * {"ms": 1e-3, "us": 1e-6, "s": 1.0, None: 1e-3}[m.group(2)]
m = re.fullmatch(r"([0-9.]+)([kmg]?)bit", sys.argv[2])
rate = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
print(rtt, int(rate))
PY
}

bench_cleanup_extra() {
    stop_all
    if (( wan_up )); then wan down >/dev/null 2>&1 || echo "$ME: 'wan-emu --name $WNAME down' failed" >&2; fi
}

# bash -c "$STAMP_EXEC" stamp FILE CMD [ARGS...]: writes the wall clock
# (ns, like "date +%s%N") to FILE, then execs CMD in the same process.  Run
# inside a site ("wan exec dst bash -c ..."), it starts a timed run after
# "ip netns exec" (~8 ms here, an artifact of the emulator) and bash's own
# start, with no fork between the stamp and the program.
STAMP_EXEC='t=$EPOCHREALTIME; printf "%s000\n" "${t/[.,]/}" > "$1"; shift; exec "$@"'

# Seconds from "date +%s%N" stamps.
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b - a) / 1e9 }'; }

# link_bytes: rx+tx bytes of wan0 in dst.
link_bytes() {
    wan exec dst ip -s -j link show dev wan0 | python3 -c '
import json, sys
s = json.load(sys.stdin)[0]["stats64"]
print(s["rx"]["bytes"] + s["tx"]["bytes"])'
}

# link_ceiling PORT MBYTES: what the emulated link really carries, measured
# like any run: one plain TCP stream of MBYTES MB from src (listening on
# 10.254.0.1:PORT, a port wan_start forwards) to dst, through the same
# link.  Sets C_PAYLOAD (payload bytes/s), C_FRAMES (frame bytes/s at the
# dst veth, the link column's counter) over the stream's last three
# quarters (start-up excluded: the best a sender could do), C_RATIO
# (frames per payload byte).  The limit a migration is compared with
# assumes the nominal rate; no TCP stream gets all of it.
C_PAYLOAD= C_FRAMES= C_RATIO=
link_ceiling() {
    local port=$1 mb=$2 spid out l0 l1 raddr
    raddr=$(wan relay-addr "$port")          # HOST:PORT in dst
    start_bg spid "$WAN" --name "$WNAME" exec src python3 -c '
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.254.0.1", int(sys.argv[1]))); s.listen(1); s.settimeout(30)
c, _ = s.accept(); buf = bytes(range(256)) * 4096
left = int(sys.argv[2]) * 1000000
while left > 0:
    n = c.send(buf[:min(left, len(buf))]); left -= n
c.close()' "$port" "$mb"
    l0=$(link_bytes)
    out=$(wan exec dst python3 -c '
import socket, sys, time
addr, port, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) * 1000000
# The sender may not listen yet (10 s): a refused connection, or in relay
# mode one the relay accepts and closes without a byte, is tried again.
for i in range(200):
    try:
        c = socket.create_connection((addr, port), timeout=30)
        first = c.recv(1 << 20)
        if first:
            break
        c.close()
    except OSError:
        pass
    time.sleep(0.05)
else:
    sys.exit("cannot connect to the ceiling stream")
got, mark, t_mark, d = 0, total // 4, None, first
while d:
    got += len(d)
    if t_mark is None and got >= mark:
        t_mark, b_mark = time.monotonic(), got
    d = c.recv(1 << 20)
t_end = time.monotonic()
if got != total or t_mark is None or t_end <= t_mark:
    sys.exit("ceiling stream: %d of %d bytes" % (got, total))
print("%.0f %.6f %d" % ((got - b_mark) / (t_end - t_mark), t_end - t_mark, got))' \
        "${raddr%:*}" "${raddr##*:}" "$mb") || { stop_pid "$spid" "ceiling sender"; return 1; }
    l1=$(link_bytes)
    stop_pid "$spid" "ceiling sender"    # done: it closed after the last byte
    read -r C_PAYLOAD _ _ <<< "$out"
    # frames per payload byte over the whole stream (headers, acks)
    C_RATIO=$(awk -v f=$((l1 - l0)) -v p=$(( mb * 1000000 )) 'BEGIN { printf "%.4f", f / p }')
    C_FRAMES=$(awk -v r="$C_PAYLOAD" -v k="$C_RATIO" 'BEGIN { printf "%.0f", r * k }')
}

# wait_file_ready FILE PID SECONDS: until FILE is non-empty (or PID dies).
wait_file_ready() {
    local i
    for (( i = 0; i < $3 * 20; i++ )); do
        [[ -s $1 ]] && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

# Results of one run: R_TIME (seconds, or "> CAP", or FAIL), R_LINK bytes.
R_TIME= R_LINK= R_NOTE= R_STEAL=

# steal_ms: CPU time the hypervisor gave to others so far, all CPUs, in ms
# (the "steal" column of /proc/stat; 0 on bare metal).  A run whose
# machine was taken away from it is slow for reasons not its own.
steal_ms() {
    awk -v hz="$(getconf CLK_TCK)" 'NR == 1 { printf "%d\n", $9 * 1000 / hz }' /proc/stat
}

# run_xnbd NAME URI [PROXY OPTIONS...]: proxy --cache-all in dst, timed.
run_xnbd() {
    local name=$1 uri=$2 t0 l0 l1 pid
    shift 2
    warm "$img"                   # the source reads from the page cache
    rm -f "$tmp/$name".{img,bm,ctl,sock,pid,status,samples}
    # The poller starts first: its Python start-up is not in the copy's time.
    rm -f "$tmp/$name.t0" "$tmp/$name.t0.ready"
    proxy_wait_complete "$tmp/$name.ctl" "@$tmp/$name.t0" "$CAP" "$tmp/$name.status" \
        "$tmp/$name.samples" > "$tmp/$name.time" &
    local wpid=$! i=0
    while [[ ! -e $tmp/$name.t0.ready ]] && (( i++ < 1000 )); do sleep 0.01; done
    l0=$(link_bytes)
    local s0
    s0=$(steal_ms)
    # The clock starts at the proxy's exec in dst (STAMP_EXEC) and stops at
    # the completion the proxy records (status completed_at).
    start_bg pid "$WAN" --name "$WNAME" exec dst bash -c "$STAMP_EXEC" stamp "$tmp/$name.t0" \
        "$PROXY" --target "$uri" --cache "$tmp/$name.img" \
        --bitmap "$tmp/$name.bm" --control "$tmp/$name.ctl" -u "$tmp/$name.sock" \
        -p "$tmp/$name.pid" --cache-all "$@" 2>"$tmp/$name.log"
    if wait "$wpid" && R_TIME=$(cat "$tmp/$name.time") && [[ $R_TIME =~ ^[0-9.]+$ ]]; then
        :
    else
        R_TIME=$(cat "$tmp/$name.time" 2>/dev/null || echo FAIL)
        [[ $R_TIME == TIMEOUT ]] && R_TIME="> $CAP" || R_TIME=FAIL
        echo "$ME: $name did not complete; the end of its log:" >&2
        tail -5 "$tmp/$name.log" | sed 's/^/    /' >&2
    fi
    l1=$(link_bytes)
    R_LINK=$((l1 - l0))
    R_STEAL=$(( $(steal_ms) - s0 ))
    R_NOTE="$(status_summary "$tmp/$name.status"); $(trace_summary "$tmp/$name.samples"); CPU stolen by the hypervisor during the run: $R_STEAL ms"
    stop_pid "$pid" "$name proxy"
    {
        echo "# $SETTING_LABEL $name: t_s fetched_bytes fetch_rate_Bps window_bytes rtt_us inflight_blocks"
        cat "$tmp/$name.samples" 2>/dev/null || true
        echo "# final: $R_NOTE"
        echo "# log:"
        sed 's/^/#   /' "$tmp/$name.log"
    } >> "$TRACE"
}

# trace_summary SAMPLES: the proxy's fetch rate and window in the middle
# 80% of a run (from proxy_wait_complete's samples, every 0.5 s).
trace_summary() {
    python3 - "$1" <<'PY'
import sys
try:
    rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
except OSError:
    rows = []
if len(rows) < 3:
    print("too short for a rate trace"); sys.exit(0)
mid = rows[len(rows) // 10: len(rows) - len(rows) // 10] or rows
def med(v):
    v = sorted(v); return v[len(v) // 2]
rate = [int(r[2]) for r in mid]
win = [int(r[3]) for r in mid]
rtt = [int(r[4]) for r in mid if r[4].isdigit()]
print("mid-run fetch_rate median %.1f MB/s (min %.1f, max %.1f), window median %.2f MB"
      " (min %.2f, max %.2f), rtt_us median %s" % (
    med(rate) / 1e6, min(rate) / 1e6, max(rate) / 1e6, med(win) / 1e6,
    min(win) / 1e6, max(win) / 1e6, med(rtt) if rtt else "-"))
PY
}

run_nbdcopy() {
    local t0 t1 l0 rc=0
    warm "$img"                   # the source reads from the page cache
    rm -f "$tmp/nbdcopy.img"
    l0=$(link_bytes)
    wan exec dst bash -c "$STAMP_EXEC" stamp "$tmp/nbdcopy.t0" timeout "$CAP" \
        nbdcopy "nbd://$1/" "$tmp/nbdcopy.img" >"$tmp/nbdcopy.log" 2>&1 || rc=$?
    t1=$(date +%s%N)
    t0=$(cat "$tmp/nbdcopy.t0" 2>/dev/null) || t0=$t1
    R_LINK=$(( $(link_bytes) - l0 ))
    R_NOTE="nbdcopy $(nbdcopy --version 2>/dev/null | awk 'NR == 1 { print $2 }') defaults"
    if (( rc == 124 )); then R_TIME="> $CAP"
    elif (( rc )); then
        R_TIME=FAIL
        echo "$ME: nbdcopy failed (status $rc):" >&2
        sed 's/^/    /' "$tmp/nbdcopy.log" >&2
    else R_TIME=$(secs "$t0" "$t1")
    fi
    rm -f "$tmp/nbdcopy.img"
}

run_nbdkit() {
    local t0 l0 kpid hpid i done=0 now
    warm "$img"                   # the source reads from the page cache
    rm -f "$tmp/nbdkit.sock" "$tmp/nbdkit.pid"
    mkdir -p "$tmp/cow"
    l0=$(link_bytes)
    t0=$(date +%s%N)
    start_bg kpid "$WAN" --name "$WNAME" exec dst env TMPDIR="$tmp/cow" nbdkit -f -v -U "$tmp/nbdkit.sock" \
        --pidfile "$tmp/nbdkit.pid" --filter=scan --filter=cow \
        nbd uri="nbd://$1/" cow-on-read=true cow-on-cache=true 2>"$tmp/nbdkit.log"
    if ! wait_file_ready "$tmp/nbdkit.pid" "$kpid" 30; then
        R_TIME=FAIL R_LINK=0 R_NOTE="nbdkit did not start"
        { grep -v 'debug' "$tmp/nbdkit.log" || true; } | tail -5 | sed 's/^/    /' >&2
        stop_pid "$kpid" nbdkit
        return 0
    fi
    start_bg hpid "$LAT" -H -t $((CAP + 60)) "nbd+unix:///?socket=$tmp/nbdkit.sock" \
        >"$tmp/hold.log" 2>&1
    R_TIME="> $CAP"
    # Bounded by the clock (grep of a growing debug log is not free), and
    # the client above holds on for a minute longer than this.
    local deadline=$(( t0 + CAP * 1000000000 ))
    while (( $(date +%s%N) < deadline )); do
        if grep -q 'scan: finished scanning' "$tmp/nbdkit.log"; then done=1; break; fi
        kill -0 "$kpid" 2>/dev/null || break
        kill -0 "$hpid" 2>/dev/null || break
        sleep 0.05
    done
    now=$(date +%s%N)
    if (( done )); then R_TIME=$(secs "$t0" "$now")
    elif ! kill -0 "$kpid" 2>/dev/null || ! kill -0 "$hpid" 2>/dev/null; then
        R_TIME=FAIL
        echo "$ME: nbdkit or its client died; the end of their logs:" >&2
        { grep -v 'debug' "$tmp/nbdkit.log" || true; } | tail -5 | sed 's/^/    /' >&2
        sed 's/^/    /' "$tmp/hold.log" >&2
    fi
    R_LINK=$(( $(link_bytes) - l0 ))
    R_NOTE="nbdkit $(nbdkit --version 2>/dev/null | awk '{ print $2 }'), scan-size 2M and cow-block-size 64K (defaults)"
    stop_pid "$hpid" "lat -H"
    stop_pid "$kpid" nbdkit
    rm -rf "$tmp/cow"
}

# run_lat NAME OFFSETS URI [PROXY OPTIONS...]: a fresh proxy in dst; with
# --cache-all, waits until the background copy has moved 1/12 of the data
# (its window has opened up); then times LAT_N single reads (lat).  Sets
# L_RESULT ("n=.. p50_us=.. p90_us=.. p99_us=.. max_us=.."), L_MISSES
# (on-demand fetches the proxy counted meanwhile) and L_STATE.  With
# --cache-all, only reads that started before the copy completed count.
L_RESULT= L_MISSES= L_STATE=
run_lat() {
    local name=$1 offs=$2 uri=$3 pid i before after fetched wpid= done_at=
    shift 3
    rm -f "$tmp/$name".{img,bm,ctl,sock,pid,done,status}
    start_bg pid "$WAN" --name "$WNAME" exec dst "$PROXY" --target "$uri" --cache "$tmp/$name.img" \
        --bitmap "$tmp/$name.bm" --control "$tmp/$name.ctl" -u "$tmp/$name.sock" \
        -p "$tmp/$name.pid" "$@" 2>"$tmp/$name.log"
    L_RESULT=FAIL L_MISSES=- L_STATE=-
    if ! wait_file_ready "$tmp/$name.pid" "$pid" 60; then
        echo "$ME: $name proxy did not start:" >&2
        tail -5 "$tmp/$name.log" | sed 's/^/    /' >&2
        stop_pid "$pid" "$name proxy"
        return 0
    fi
    if [[ " $* " == *" --cache-all "* ]]; then
        # LAT_AT_START=1: the reads start with the copy (its start-up, when
        # the window is still being sized); else once 1/12 of it is in.
        for (( i = 0; i < CAP * 10 && ${LAT_AT_START:-0} != 1; i++ )); do
            fetched=$(sockcmd_status "$tmp/$name.ctl" bytes.fetched)
            [[ $fetched =~ ^[0-9]+$ ]] && (( fetched >= NONZERO / 12 )) && break
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        # Notes when the copy completes (seconds since the epoch).
        start_bg wpid proxy_wait_complete "$tmp/$name.ctl" 0 "$CAP" "$tmp/$name.status" \
            >"$tmp/$name.done" 2>/dev/null
    fi
    before=$(sockcmd_status "$tmp/$name.ctl" fetches.ondemand)
    local rt0 rt1
    rt0=$(retrans)
    L_RESULT=$("$LAT" -n "$LAT_N" -f "$offs" -o "$tmp/$name.samples" \
               "nbd+unix:///?socket=$tmp/$name.sock" 2>&1) ||
        { echo "$ME: lat against $name failed: $L_RESULT" >&2; L_RESULT=FAIL; }
    after=$(sockcmd_status "$tmp/$name.ctl" fetches.ondemand)
    rt1=$(retrans)
    L_STATE="$(sockcmd_status "$tmp/$name.ctl" state) at progress $(sockcmd_status "$tmp/$name.ctl" progress)"
    [[ $rt0 =~ ^[0-9]+$ && $rt1 =~ ^[0-9]+$ ]] && L_STATE="$L_STATE; TCP retransmissions during the reads $((rt1 - rt0))"
    [[ $before =~ ^[0-9]+$ && $after =~ ^[0-9]+$ ]] && L_MISSES=$((after - before))
    stop_pid "$pid" "$name proxy"
    if [[ -n $wpid ]]; then
        # The poller ends by itself once the proxy is gone.
        for (( i = 0; i < 100; i++ )); do kill -0 "$wpid" 2>/dev/null || break; sleep 0.1; done
        stop_pid "$wpid" "status poller"
        done_at=$(cat "$tmp/$name.done" 2>/dev/null || true)
        [[ $done_at =~ ^[0-9.]+$ ]] || done_at=
        [[ -z $done_at ]] || L_STATE="$L_STATE, completed during the reads"
    fi
    # Statistics over the misses: reads that started before the copy
    # completed and took at least half an RTT (a read answered faster
    # cannot have crossed the WAN: the copy had already brought its block).
    if [[ $L_RESULT != FAIL ]]; then
        L_RESULT=$(python3 - "$tmp/$name.samples" "$rtt_s" "$done_at" <<'PY'
import sys
rtt = float(sys.argv[2])
done = float(sys.argv[3]) if sys.argv[3] else None
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
late = [r for r in rows if done is not None and float(r[2]) >= done]
early = [r for r in rows if r not in late]
us = sorted(int(r[1]) for r in early if int(r[1]) >= rtt * 1e6 / 2)
hits = len(early) - len(us)
n = len(us)
if not n:
    print("no misses measured (%d reads, %d after the copy completed)" % (len(rows), len(late)))
    sys.exit(0)
p = lambda q: us[max(1, (n * q + 99) // 100) - 1]
extra = []
if hits:
    extra.append("%d hits under RTT/2 left out" % hits)
if late:
    extra.append("%d reads after the copy completed left out" % len(late))
print("n=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d%s" % (
    n, p(50), p(90), p(99), us[-1], " (%s)" % "; ".join(extra) if extra else ""))
PY
)
    fi
    {
        echo "# $SETTING_LABEL $name: offset us start_epoch_s (state after: $L_STATE; done at ${done_at:-never})"
        cat "$tmp/$name.samples" 2>/dev/null || true
    } >> "$TRACE"
    rm -f "$tmp/$name.img" "$tmp/$name.bm"
}

# retrans: TCP segments retransmitted so far in both sites' namespaces
# (drops at the emulated bottleneck show up here), or "-".
retrans() {
    local n=0 v ns
    for ns in src dst; do
        v=$(wan exec "$ns" nstat -az TcpRetransSegs 2>/dev/null | awk '$1 == "TcpRetransSegs" { print $2 }')
        [[ $v =~ ^[0-9]+$ ]] || { echo -; return; }
        n=$((n + v))
    done
    echo "$n"
}

# sockcmd_status CTL KEY.KEY: one member of a proxy's status now, or "-".
sockcmd_status() {
    python3 - "$1" "$2" <<'PY'
import json, socket, sys
try:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sys.argv[1])
    f = s.makefile("rwb")
    f.write(b"status\n"); f.flush()
    j = json.loads(f.readline())
    for k in sys.argv[2].split("."):
        j = j[k]
    print(j)
except Exception:
    print("-")
PY
}
