#!/usr/bin/env bash
# Several migrations share one link (issue 12, item 4): N xnbd-proxy
# --cache-all in the "dst" namespace, each migrating its own image from one
# xnbd-server (exports m1..mN, WAN transport, zstd 3) in "src", over one
# emulated link (scripts/wan-emu/wan-emu, default 20 ms / 200 Mbit/s).
#
#   scripts/bench/multi.sh BUILDDIR            (as root)
#
# Round "equal": the N proxies start together.  Reported: the time until
# the last completes against the combined limit (the zstd -3 size of every
# image's non-zero blocks / rate + 2 x RTT); each migration's rate (its
# wire bytes received per second) over the middle 80 % of the time all N
# ran, and the largest deviation from their mean (target within +-20 %);
# and, while all copy, each proxy's serial 4 KiB misses (LAT_N reads each
# of blocks in the last 40 % of its image, all N clients at once), p50 /
# p99 against 2 x RTT + 5 ms.
# Round "capped": the same, with `xnbd-ctl rate` capping proxy 1 at
# BENCH_MULTI_CAP as soon as it runs, until the others complete: its rate
# (NBD bytes read from the source, as the cap counts them: fetched blocks
# and the zero blocks a background read spans) against the cap, and the
# others' rates.
#
# Environment:
#   BENCH_MULTI_N        migrations (default 4)
#   BENCH_MULTI_MIB      image size each (default 512)
#   BENCH_MULTI_SETTING  RTT:RATE (default 20ms:200mbit)
#   BENCH_MULTI_CAP      the cap of round "capped" (default 2M bytes/s)
#   BENCH_MULTI_ROUNDS   which rounds (default "equal capped")
#   BENCH_LAT_N          reads per proxy (default 100)
#   BENCH_PEER_CAP       seconds after which a round is stopped (default 600)
#   BENCH_TMPDIR         scratch directory (default $TMPDIR or /tmp)
#
# Saves the table to BUILDDIR/bench-multi.txt and the samples to
# BUILDDIR/multi-trace.txt.  A benchmark, not a test: it fails only when it
# cannot run.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=proxy.sh
. "$BENCH_DIR/proxy.sh"
bench_init multi.sh "$@"
LAT=$BUILDDIR/tests/lat
CTL=$BUILDDIR/xnbd-ctl
WAN=$PWD/scripts/wan-emu/wan-emu
OUT=$BUILDDIR/bench-multi.txt
TRACE=$BUILDDIR/multi-trace.txt
N=${BENCH_MULTI_N:-4}
MIB=${BENCH_MULTI_MIB:-512}
SETTING=${BENCH_MULTI_SETTING:-20ms:200mbit}
RCAP=${BENCH_MULTI_CAP:-2M}
LAT_N=${BENCH_LAT_N:-100}
CAP=${BENCH_PEER_CAP:-600}
ROUNDS=${BENCH_MULTI_ROUNDS:-equal capped}
ZSTD_LEVEL=3

for v in N MIB LAT_N CAP; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done
(( N >= 2 && N <= 8 )) || die "BENCH_MULTI_N must be 2 to 8, not $N"
[[ $SETTING =~ ^[0-9.]+(ms|us|s)?:[0-9.]+[kmg]?bit$ ]] ||
    die "bad BENCH_MULTI_SETTING '$SETTING' (use RTT:RATE, e.g. 20ms:200mbit)"
(( EUID == 0 )) || die "must run as root (network namespaces and tc)"
for f in "$XNBD" "$PROXY" "$CTL" "$BUILDDIR/wan-relay" "$LAT"; do
    [[ -x $f ]] || die "$f not found; run 'make' first"
done
for tool in zstd ip python3; do
    command -v "$tool" >/dev/null || die "$tool not found; run scripts/install-deps.sh"
done

export XNBD_BUILD=$BUILDDIR
WNAME=xmulti$$
wan_up=0
PIDS=()
# shellcheck source=wan-lib.sh
. "$BENCH_DIR/wan-lib.sh"
bench_tmpdir multi
chmod 755 "$tmp"
: > "$TRACE"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- Images
ZSUM=0
exports=()
for (( i = 1; i <= N; i++ )); do
    echo "multi: image $i of $N (${MIB} MiB, gen-image.py seed $((10 + i)))"
    python3 "$BENCH_DIR/gen-image.py" "$MIB" "$tmp/m$i.src" $((10 + i)) >/dev/null
    mkdir -p "$tmp/s$i"
    read -r _ z < <(python3 "$BENCH_DIR/image-stats.py" "$tmp/m$i.src" "$ZSTD_LEVEL" "$LAT_N" "$tmp/s$i" $((10 + i)))
    ZSUM=$((ZSUM + z))
    exports+=(-e "m$i=$tmp/m$i.src")
done
sync

rtt=${SETTING%%:*} rate=${SETTING#*:}
read -r rtt_s rate_bps < <(setting_numbers "$rtt" "$rate")
LIMIT=$(awk -v b="$ZSUM" -v r="$rate_bps" -v t="$rtt_s" 'BEGIN { printf "%.2f", b * 8 / r + 2 * t }')
echo "multi: zstd -$ZSTD_LEVEL of the images' non-zero blocks $ZSUM B; combined limit $LIMIT s"

echo "multi: wan-emu up --rtt $rtt --rate $rate"
wan_start "$rtt" "$rate" 10810
start_bg spid "$WAN" --name "$WNAME" exec src "$XNBD" -r --image-id=stat -W 10.254.0.1:10810 \
    -l 127.0.0.1:0 -p "$tmp/src.pid" "${exports[@]}" 2>"$tmp/src.log"
wait_file_ready "$tmp/src.pid" "$spid" 10 || die "xnbd-server in src did not start: $(cat "$tmp/src.log")"
a=$(wan relay-addr 10810)

# round NAME [CAPPED]: the N migrations at once; prints one JSON line.
round() {
    local name=$1 capped=${2:-} i p pids=() lpids=()
    for (( i = 1; i <= N; i++ )); do
        warm "$tmp/m$i.src"
        rm -f "$tmp/$name$i".{img,bm,ctl,sock,lat}
    done
    local t0
    t0=$(date +%s%N)
    for (( i = 1; i <= N; i++ )); do
        start_bg p "$WAN" --name "$WNAME" exec dst "$PROXY" --target "xnbd://$a/m$i" \
            --cache "$tmp/$name$i.img" --bitmap "$tmp/$name$i.bm" --control "$tmp/$name$i.ctl" \
            -u "$tmp/$name$i.sock" --cache-all 2>"$tmp/$name$i.log"
        pids+=("$p")
    done
    if [[ -n $capped ]]; then
        for (( i = 0; i < 500; i++ )); do [[ -S $tmp/${name}1.ctl ]] && break; sleep 0.01; done
        "$CTL" -c "$tmp/${name}1.ctl" rate "$RCAP" >/dev/null || echo "$ME: xnbd-ctl rate failed" >&2
    fi
    # Misses while all copy: once every proxy has moved 1/12 of the
    # limit's share, N serial readers at once.
    python3 - "$tmp" "$name" "$N" "$ZSUM" <<'PY'
import json, socket, sys, time
tmp, name, n, zsum = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
deadline = time.monotonic() + 120
def rx(i):
    try:
        s = socket.socket(socket.AF_UNIX); s.settimeout(5)
        s.connect("%s/%s%d.ctl" % (tmp, name, i))
        f = s.makefile("rwb"); f.write(b"status\n"); f.flush()
        return json.loads(f.readline())["wire"]["rx"]
    except Exception:
        return 0
while time.monotonic() < deadline:
    if all(rx(i) >= zsum / n / 12 for i in range(1, n + 1)):
        break
    time.sleep(0.05)
PY
    for (( i = 1; i <= N; i++ )); do
        start_bg p "$LAT" -n "$LAT_N" -f "$tmp/s$i/lat-copy.off" -o "$tmp/$name$i.lat" \
            "nbd+unix:///?socket=$tmp/$name$i.sock" >/dev/null
        lpids+=("$p")
    done
    # Samples every 100 ms: t, then rx fetched state of each proxy; until
    # all complete (round capped: all but the capped one).
    python3 - "$tmp" "$name" "$N" "$t0" "$CAP" "${capped:+1}" > "$tmp/$name.samples" <<'PY'
import json, socket, sys, time
tmp, name, n, t0, cap = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
skip = int(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[6] else 0
conns = {}
def status(i):
    try:
        if i not in conns:
            s = socket.socket(socket.AF_UNIX); s.settimeout(5)
            s.connect("%s/%s%d.ctl" % (tmp, name, i))
            conns[i] = s.makefile("rwb")
        f = conns[i]; f.write(b"status\n"); f.flush()
        return json.loads(f.readline())
    except Exception:
        conns.pop(i, None)
        return None
while True:
    t = (time.time_ns() - t0) / 1e9
    row, done = ["%.3f" % t], 0
    for i in range(1, n + 1):
        j = status(i)
        st = j["state"] if j else "-"
        done += i != skip and st in ("complete", "detached")
        row += [str(j["wire"]["rx"] if j else -1), str(j["bytes"]["fetched"] + j["bytes"]["bridged"] if j else -1), st]
    print(" ".join(row), flush=True)
    if done == n - (1 if skip else 0) or t > cap:
        break
    time.sleep(0.1)
PY
    for p in "${lpids[@]}"; do wait "$p" 2>/dev/null || true; stop_pid "$p" lat; done
    for p in "${pids[@]}"; do stop_pid "$p" "$name proxy"; done
    { echo "# $name: t, then rx_i fetched_i state_i (i = 1..$N)"; cat "$tmp/$name.samples"; } >> "$TRACE"
    python3 - "$tmp" "$name" "$N" "$rtt_s" "$LIMIT" <<'PY'
import json, sys
tmp, name, n, rtt, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
rows = [l.split() for l in open("%s/%s.samples" % (tmp, name)) if l.strip()]
t = [float(r[0]) for r in rows]
rx = [[int(r[1 + 3 * i]) for r in rows] for i in range(n)]
fe = [[int(r[2 + 3 * i]) for r in rows] for i in range(n)]
st = [[r[3 + 3 * i] for r in rows] for i in range(n)]
done = []
for i in range(n):
    k = next((k for k, s in enumerate(st[i]) if s in ("complete", "detached")), None)
    done.append(t[k] if k is not None else None)
res = {"round": name, "total_s": max(d for d in done if d is not None) if all(done) else None,
       "limit_s": limit, "done_s": done}
# The middle 80 % of the time all ran (from the first data to the first end).
start = next((t[k] for k in range(len(t)) if all(rx[i][k] > 0 for i in range(n))), None)
end = min(d for d in done if d is not None) if any(done) else t[-1]
if start is not None and end > start:
    a, b = start + 0.1 * (end - start), start + 0.9 * (end - start)
    ka = min(range(len(t)), key=lambda k: abs(t[k] - a))
    kb = min(range(len(t)), key=lambda k: abs(t[k] - b))
    if kb > ka:
        rates = [(rx[i][kb] - rx[i][ka]) / (t[kb] - t[ka]) for i in range(n)]
        res["rates_Bps"] = [int(r) for r in rates]
        res["fetch_Bps"] = [int((fe[i][kb] - fe[i][ka]) / (t[kb] - t[ka])) for i in range(n)]
        res["window_s"] = [round(t[ka], 2), round(t[kb], 2)]
# Misses: reads that took at least half an RTT and started before that
# proxy completed.
lat = []
for i in range(n):
    try:
        s = [l.split() for l in open("%s/%s%d.lat" % (tmp, name, i + 1)) if l.strip()]
    except OSError:
        s = []
    us = sorted(int(r[1]) for r in s if int(r[1]) >= rtt * 1e6 / 2)
    if us:
        p = lambda q: us[max(1, (len(us) * q + 99) // 100) - 1]
        lat.append({"n": len(us), "p50_us": p(50), "p99_us": p(99), "max_us": us[-1]})
    else:
        lat.append({"n": 0})
res["misses"] = lat
print(json.dumps(res))
PY
}

results=$tmp/results.jsonl
: > "$results"
if [[ " $ROUNDS " == *" equal "* ]]; then
    echo "multi: round equal ($N migrations at once)"
    round equal | tee -a "$results"
fi
if [[ " $ROUNDS " == *" capped "* ]]; then
    echo "multi: round capped (proxy 1 capped at $RCAP with xnbd-ctl rate)"
    round capped 1 | tee -a "$results"
fi

python3 - "$results" "$N" "$MIB" "$SETTING" "$mode_line" "$rtt_s" "$RCAP" "$load_before" \
    "$(cut -d' ' -f1-3 /proc/loadavg)" > "$OUT" <<'PY'
import json, re, sys
path, n, mib, setting, mode, rtt, rcap, lb, la = sys.argv[1:10]
n, rtt = int(n), float(rtt)
m = re.fullmatch(r"([0-9.]+)([kKmMgG]?)(bit)?", rcap)
if m.group(3):       # as xnbd-ctl reads it: kbit/mbit/gbit are decimal bits, K/M/G binary bytes
    cap = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()] / 8
else:
    cap = float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
rows = [json.loads(l) for l in open(path) if l.strip()]
print("%d migrations of %s MiB (gen-image.py: 40%% random, 30%% zero, 30%% text) from one"
      " xnbd-server, one link %s (%s); load before %s, after %s" % (n, mib, setting, mode, lb, la))
print("targets: total <= 1.15 x the combined limit; rates within +-20 %% of their mean while"
      " all run; miss p99 <= 2 x RTT + 5 ms = %.0f ms" % ((2 * rtt + 0.005) * 1e3))
for r in rows:
    tot, lim = r.get("total_s"), r["limit_s"]
    print("")
    if r["round"] == "capped":
        print("round capped: stopped when the %d others completed" % (n - 1))
    else:
        print("round %s: total %s s, combined limit %.2f s, ratio %s" % (
            r["round"], "%.2f" % tot if tot else "FAIL", lim, "%.2f" % (tot / lim) if tot else "-"))
    rates = r.get("rates_Bps")
    if rates:
        if r["round"] == "capped":
            others = rates[1:]
            mean = sum(others) / len(others)
            dev = max(abs(x - mean) / mean for x in others) if mean else 0
            f0 = r["fetch_Bps"][0]
            print("  rates while all ran (%s s): capped one read %.2f MB/s of NBD data (fetched +"
                  " bridged zeros, what the cap counts: %.2f MB/s, %.2f x), %.2f MB/s on the wire; others %s MB/s"
                  " on the wire, largest deviation from their mean %.0f %%" % (
                      "-".join(str(x) for x in r["window_s"]), f0 / 1e6, cap / 1e6, f0 / cap,
                      rates[0] / 1e6, ", ".join("%.2f" % (x / 1e6) for x in others), dev * 100))
        else:
            mean = sum(rates) / len(rates)
            dev = max(abs(x - mean) / mean for x in rates) if mean else 0
            print("  rates while all ran (%s s): %s MB/s; largest deviation from the mean %.0f %%" % (
                "-".join(str(x) for x in r["window_s"]), ", ".join("%.2f" % (x / 1e6) for x in rates),
                dev * 100))
    for i, l in enumerate(r["misses"]):
        if l.get("n"):
            print("  proxy %d: %d misses, p50 %.1f ms, p99 %.1f ms, max %.1f ms" % (
                i + 1, l["n"], l["p50_us"] / 1e3, l["p99_us"] / 1e3, l["max_us"] / 1e3))
        else:
            print("  proxy %d: no misses measured" % (i + 1))
    print("  completed at: %s s" % ", ".join("%.2f" % d if d else "-" for d in r["done_s"]))
PY
echo
cat "$OUT"
