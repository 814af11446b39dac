#!/usr/bin/env bash
# The source's read map (issue 13: "for disks, the blocks the source saw
# read most recently" first).  A VM's disk moves while the VM keeps reading
# its working set:
#
#   1. site A: xnbd-server serves a generated image (gen-image.py) over the
#      WAN transport; "the VM at A" reads its working set through it (R
#      reads of 4 KiB spread over H regions of 1 MiB, drawn at random);
#   2. site B: xnbd-proxy --standby --cache-all, then 'xnbd-ctl activate'
#      (the switch-over) and at once "the VM at B" reads the same working
#      set again, serially, through the proxy, while the copy runs.
#
# Rounds: "map" (the server keeps its read map: the proxy copies those H
# regions first) and "no-map" (xnbd-server --no-read-map: ascending sweep
# plus pre-paging after each miss).  Reported for each: the VM's pass at B
# (seconds), how many of its reads waited for the WAN (took >= RTT/2) and
# their p50/p99, the proxy's on-demand fetches, the regions the map named,
# and the copy's total time (it should not change); then the ratio of the
# passes (map / no-map) and of the reads that waited.
#
#   scripts/bench/read-order.sh BUILDDIR            (as root)
#
# Environment:
#   BENCH_RO_MIB       image size (default 1024)
#   BENCH_RO_REGIONS   working-set regions of 1 MiB, H (default 32)
#   BENCH_RO_READS     reads of the working set, R (default 400)
#   BENCH_RO_SETTING   RTT:RATE (default 20ms:200mbit)
#   BENCH_RO_ROUNDS    default "map no-map"
#   BENCH_PEER_CAP     seconds after which a copy is given up (default 600)
#   BENCH_TMPDIR       scratch directory (default $TMPDIR or /tmp)
#
# Saves the table to BUILDDIR/bench-read-order.txt.  A benchmark, not a
# test: it fails only when it cannot run.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=proxy.sh
. "$BENCH_DIR/proxy.sh"
bench_init read-order.sh "$@"
LAT=$BUILDDIR/tests/lat
CTL=$BUILDDIR/xnbd-ctl
WAN=$PWD/scripts/wan-emu/wan-emu
OUT=$BUILDDIR/bench-read-order.txt
TRACE=$BUILDDIR/read-order-trace.txt
MIB=${BENCH_RO_MIB:-1024}
H=${BENCH_RO_REGIONS:-32}
R=${BENCH_RO_READS:-400}
SETTING=${BENCH_RO_SETTING:-20ms:200mbit}
ROUNDS=${BENCH_RO_ROUNDS:-map no-map}
CAP=${BENCH_PEER_CAP:-600}

for v in MIB H R CAP; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done
(( H <= MIB )) || die "BENCH_RO_REGIONS ($H) must not exceed the image's MiB ($MIB)"
[[ $SETTING =~ ^[0-9.]+(ms|us|s)?:[0-9.]+[kmg]?bit$ ]] ||
    die "bad BENCH_RO_SETTING '$SETTING' (use RTT:RATE, e.g. 20ms:200mbit)"
for r in $ROUNDS; do [[ $r == map || $r == no-map ]] || die "unknown round '$r' (map, no-map)"; done
(( EUID == 0 )) || die "must run as root (network namespaces and tc)"
for f in "$XNBD" "$PROXY" "$CTL" "$BUILDDIR/wan-relay" "$LAT"; do
    [[ -x $f ]] || die "$f not found; run 'make' first"
done

export XNBD_BUILD=$BUILDDIR
WNAME=xro$$
wan_up=0
PIDS=()
# shellcheck source=wan-lib.sh
. "$BENCH_DIR/wan-lib.sh"
bench_tmpdir read-order
chmod 755 "$tmp"
: > "$TRACE"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

echo "read-order: a ${MIB} MiB image (gen-image.py seed 5); working set $H MiB, $R reads"
img=$tmp/src.img
python3 "$BENCH_DIR/gen-image.py" "$MIB" "$img" 5 >/dev/null
# The working set: H regions at random, R reads in them (seeded), as
# offsets for lat -f.
python3 - "$MIB" "$H" "$R" "$tmp/ws.off" <<'PY'
import random, sys
mib, h, r, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
rnd = random.Random(13)
regions = rnd.sample(range(mib), h)
with open(out, "w") as f:
    for _ in range(r):
        f.write("%d\n" % (rnd.choice(regions) * 2**20 + rnd.randrange(256) * 4096))
PY
sync

rtt=${SETTING%%:*} rate=${SETTING#*:}
read -r rtt_s rate_bps < <(setting_numbers "$rtt" "$rate")
echo "read-order: wan-emu up --rtt $rtt --rate $rate"
wan_start "$rtt" "$rate" 10810
a=$(wan relay-addr 10810)

# round NAME [SERVER OPTIONS...]: one JSON line.
round() {
    local name=$1 spid pid lpid port
    shift
    warm "$img"
    rm -f "$tmp/$name".{img,bm,ctl,sock,pid,port,lat,status,samples} "$tmp/src.pid"
    start_bg spid "$WAN" --name "$WNAME" exec src "$XNBD" -r --image-id=stat -W 10.254.0.1:10810 \
        -l 127.0.0.1:0 --port-file "$tmp/$name.port" -p "$tmp/src.pid" "$@" "$img" 2>"$tmp/$name.src.log"
    wait_file_ready "$tmp/src.pid" "$spid" 10 || die "xnbd-server in src did not start: $(cat "$tmp/$name.src.log")"
    port=$(cat "$tmp/$name.port")
    # The VM at A reads its working set (site A's own link: no WAN).
    wan exec src "$LAT" -n "$R" -f "$tmp/ws.off" "nbd://127.0.0.1:$port/" >/dev/null ||
        die "the reads at A failed"
    start_bg pid "$WAN" --name "$WNAME" exec dst "$PROXY" --target "xnbd://$a/" \
        --cache "$tmp/$name.img" --bitmap "$tmp/$name.bm" --control "$tmp/$name.ctl" \
        -u "$tmp/$name.sock" -p "$tmp/$name.pid" --standby --cache-all 2>"$tmp/$name.log"
    wait_file_ready "$tmp/$name.pid" "$pid" 60 || die "the proxy did not start: $(tail -5 "$tmp/$name.log")"
    local i st
    for (( i = 0; i < 600; i++ )); do
        st=$(sockcmd_status "$tmp/$name.ctl" state)
        [[ $st == proxying ]] && break
        sleep 0.05
    done
    [[ $st == proxying ]] || die "the proxy never connected (state $st)"
    # The switch-over, and at once the VM at B.
    local t0 t1 p0
    "$CTL" -c "$tmp/$name.ctl" activate >/dev/null || die "activate failed"
    t0=$(date +%s%N)
    "$LAT" -n "$R" -f "$tmp/ws.off" -o "$tmp/$name.lat" "nbd+unix:///?socket=$tmp/$name.sock" \
        >/dev/null || die "the reads at B failed"
    t1=$(date +%s%N)
    p0=$(sockcmd_status "$tmp/$name.ctl" fetches.ondemand)
    local copy
    copy=$(proxy_wait_complete "$tmp/$name.ctl" "$t0" "$CAP" "$tmp/$name.status" "$tmp/$name.samples") ||
        copy=FAIL
    stop_pid "$pid" "$name proxy"
    stop_pid "$spid" "xnbd-server"
    {
        echo "# $name: offset us start_epoch_s of the reads at B"
        cat "$tmp/$name.lat"
        echo "# log:"
        sed 's/^/#   /' "$tmp/$name.log"
    } >> "$TRACE"
    python3 - "$tmp/$name.lat" "$rtt_s" "$name" "$t0" "$t1" "$p0" "$copy" "$tmp/$name.status" <<'PY'
import json, sys
lat, rtt, name, t0, t1, od, copy, stf = sys.argv[1:9]
rtt = float(rtt)
us = [int(l.split()[1]) for l in open(lat) if l.strip()]
waited = sorted(u for u in us if u >= rtt * 1e6 / 2)
def p(v, q):
    return v[max(1, (len(v) * q + 99) // 100) - 1] if v else None
try:
    st = json.load(open(stf))
except Exception:
    st = {}
print(json.dumps({"round": name, "pass_s": (int(t1) - int(t0)) / 1e9, "reads": len(us),
                  "waited": len(waited), "waited_p50_us": p(waited, 50), "waited_p99_us": p(waited, 99),
                  "ondemand": int(od) if od.isdigit() else None,
                  "recent_regions": st.get("background", {}).get("recent_regions"),
                  "recent_fetches": st.get("fetches", {}).get("recent"),
                  "copy_s": float(copy) if copy.replace(".", "", 1).isdigit() else None}))
PY
}

results=()
for r in $ROUNDS; do
    echo "read-order: round $r"
    if [[ $r == map ]]; then results+=("$(round map)"); else results+=("$(round no-map --no-read-map)"); fi
    echo "  ${results[-1]}"
done

{
    echo "read-order: $(date -u +%FT%TZ) $(uname -m), $(nproc) CPUs, load before $load_before"
    echo "setting $SETTING ($mode_line); image $MIB MiB (gen-image.py seed 5); working set $H regions of 1 MiB, $R reads of 4 KiB"
    echo "The VM at A read its working set through xnbd-server; the proxy at B (--standby"
    echo "--cache-all) was activated and the VM at B read the same working set at once."
    printf '%-8s %8s %8s %10s %10s %9s %8s %8s\n' round pass_s waited p50_ms p99_ms ondemand regions copy_s
    python3 - "${results[@]}" <<'PY'
import json, sys
rows = {}
for a in sys.argv[1:]:
    j = json.loads(a)
    rows[j["round"]] = j
    f = lambda v, d=1e3: "-" if v is None else "%.1f" % (v / d)
    print("%-8s %8.2f %8d %10s %10s %9s %8s %8s" % (
        j["round"], j["pass_s"], j["waited"], f(j["waited_p50_us"]), f(j["waited_p99_us"]),
        j["ondemand"], j["recent_regions"], "-" if j["copy_s"] is None else "%.2f" % j["copy_s"]))
if "map" in rows and "no-map" in rows:
    m, n = rows["map"], rows["no-map"]
    print("map / no-map: the VM's pass at B %.2f x; reads that waited for the WAN %d vs %d;"
          " copy time %s x" % (m["pass_s"] / n["pass_s"], m["waited"], n["waited"],
          "%.3f" % (m["copy_s"] / n["copy_s"]) if m["copy_s"] and n["copy_s"] else "-"))
PY
} | tee "$OUT"
