#!/usr/bin/env bash
# WAN migration benchmark (DESIGN.md §7): xnbd against the peers a user would
# pick instead, over an emulated WAN (scripts/wan-emu/wan-emu), side by side.
#
#   scripts/bench/migrate.sh BUILDDIR          (as root)
#
# For each setting (RTT, rate), on a generated image (gen-image.py: 40%
# random, 30% zero holes, 30% text blocks) served in the "src" namespace,
# with every copy made in the "dst" namespace:
#   xnbd-zstd   xnbd-proxy --cache-all from xnbd-server's WAN transport
#               (xnbd://, zstd level 3), time until status says complete
#   xnbd-plain  the same from xnbd-server's plain NBD port (nbd://)
#   nbdcopy     nbdcopy from `nbdkit file` in src to a file in dst
#   nbdkit      nbdkit --filter=scan --filter=cow nbd uri=... cow-on-read=true
#               cow-on-cache=true in dst, with one idle client connected (the
#               scan runs only while a client is); time until its debug log
#               says "scan: finished scanning the plugin"; capped
# and the on-demand latency of single 4 KiB reads of missing (non-zero)
# blocks through a fresh xnbd-proxy (xnbd://), one connection, one read at a
# time: idle (no background copy), then while --cache-all runs (reads in the
# last 40% of the image, which the ascending background copy reaches last),
# from 1/12 of the copy on ("copy") and from its first moment ("start").
# Bytes over the link: rx+tx bytes of the veth in dst (ip -s link), i.e.
# frames with their headers.  Physical limit = bytes that must cross / rate
# + 2 x RTT, where bytes that must cross = the non-zero 4 KiB blocks (plain
# runs), or those blocks concatenated and compressed by `zstd -3` (xnbd://).
#
# Environment:
#   BENCH_QUICK=1       one setting (RTT 50 ms, 200 Mbit/s) and a 256 MiB image
#   BENCH_SETTINGS      settings, e.g. "20ms:200mbit 100ms:200mbit 50ms:1gbit"
#                       (the default)
#   BENCH_SIZE_MIB      image size (default 1024; 256 with BENCH_QUICK)
#   BENCH_RUNS          which runs (default "xnbd-zstd xnbd-plain nbdcopy nbdkit lat")
#   BENCH_PEER_CAP      seconds after which a copy is stopped (default 600)
#   BENCH_LAT_N         reads per latency measurement (default 100)
#   BENCH_SEED          gen-image.py seed (default 1)
#   BENCH_TMPDIR        where images and caches go (default $TMPDIR or /tmp)
#   BENCH_NAME          names the output files (default migrate; thin.sh: thin)
#
# Saves the tables to BUILDDIR/bench-NAME.txt and the proxy's status over
# time (for diagnosis) to BUILDDIR/NAME-trace.txt.  A benchmark, not a
# test: it fails only when it cannot run.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=proxy.sh
. "$BENCH_DIR/proxy.sh"
bench_init migrate.sh "$@"
LAT=$BUILDDIR/tests/lat
WAN=$PWD/scripts/wan-emu/wan-emu
NAME=${BENCH_NAME:-migrate}
[[ $NAME =~ ^[a-z0-9-]+$ ]] || die "BENCH_NAME must be lower-case letters, digits and '-', not '$NAME'"
OUT=$BUILDDIR/bench-$NAME.txt
TRACE=$BUILDDIR/$NAME-trace.txt

QUICK=${BENCH_QUICK:-0}
if [[ $QUICK == 1 ]]; then
    SETTINGS=${BENCH_SETTINGS:-50ms:200mbit}
    SIZE_MIB=${BENCH_SIZE_MIB:-256}
else
    SETTINGS=${BENCH_SETTINGS:-20ms:200mbit 100ms:200mbit 50ms:1gbit}
    SIZE_MIB=${BENCH_SIZE_MIB:-1024}
fi
RUNS=${BENCH_RUNS:-xnbd-zstd xnbd-plain nbdcopy nbdkit lat}
CAP=${BENCH_PEER_CAP:-600}
LAT_N=${BENCH_LAT_N:-100}
SEED=${BENCH_SEED:-1}
ZSTD_LEVEL=3                      # xnbd-proxy's default --compress level

for v in SIZE_MIB CAP LAT_N; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done
[[ $SEED =~ ^[0-9]+$ ]] || die "BENCH_SEED must be a non-negative integer, not '$SEED'"
(( EUID == 0 )) || die "must run as root (network namespaces and tc, via scripts/wan-emu/wan-emu)"
for f in "$XNBD" "$PROXY" "$BUILDDIR/wan-relay" "$LAT"; do
    [[ -x $f ]] || die "$f not found; run 'make' first"
done
[[ -x $WAN ]] || die "$WAN not found"
for tool in nbdcopy nbdkit zstd ip python3; do
    command -v "$tool" >/dev/null || die "$tool not found; run scripts/install-deps.sh"
done
for s in $SETTINGS; do
    [[ $s =~ ^[0-9.]+(ms|us|s)?:[0-9.]+[kmg]?bit$ ]] ||
        die "bad setting '$s' in BENCH_SETTINGS (use RTT:RATE, e.g. 50ms:200mbit)"
done
want() { [[ " $RUNS " == *" $1 "* ]]; }

export XNBD_BUILD=$BUILDDIR       # wan-emu takes wan-relay from here
WNAME=xbench$$
wan_up=0
PIDS=()                           # every process started, stopped at exit

# shellcheck source=wan-lib.sh
. "$BENCH_DIR/wan-lib.sh"

bench_tmpdir migrate
chmod 755 "$tmp"
img=$tmp/source.img
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
: > "$TRACE"

echo "migrate: generating a ${SIZE_MIB} MiB image (seed $SEED) in $tmp"
python3 "$BENCH_DIR/gen-image.py" "$SIZE_MIB" "$img" "$SEED"
sync "$img"

# Non-zero bytes, their zstd size, and two offset lists of non-zero blocks
# for the latency runs (whole image; last 40%), spread evenly, shuffled.
read -r NONZERO ZSTD_BYTES < <(python3 "$BENCH_DIR/image-stats.py" "$img" "$ZSTD_LEVEL" "$LAT_N" "$tmp" "$SEED")
echo "migrate: non-zero bytes $NONZERO, zstd -$ZSTD_LEVEL of them $ZSTD_BYTES"


# ---------------------------------------------------------------- Settings
# One line per result, tab-separated:
#   copy   SETTING RTT_S RATE_BPS MODE RUN TIME LINK_BYTES LIMIT_S NOTE
#   lat    SETTING RTT_S RATE_BPS MODE RUN LAT_RESULT MISSES STATE
results=$tmp/results.tsv
: > "$results"
record() { local IFS=$'\t'; echo "$*" >> "$results"; }

for setting in $SETTINGS; do
    rtt=${setting%%:*} rate=${setting#*:}
    SETTING_LABEL="rtt $rtt rate $rate"
    echo "migrate: setting RTT $rtt, rate $rate"
    wan_start "$rtt" "$rate" 10809,10810,10811
    echo "  $mode_line"
    read -r rtt_s rate_bps < <(setting_numbers "$rtt" "$rate")
    lim_z=$(awk -v b="$ZSTD_BYTES" -v r="$rate_bps" -v t="$rtt_s" 'BEGIN { printf "%.2f", b * 8 / r + 2 * t }')
    lim_p=$(awk -v b="$NONZERO" -v r="$rate_bps" -v t="$rtt_s" 'BEGIN { printf "%.2f", b * 8 / r + 2 * t }')

    # Sources in src: xnbd-server (WAN transport and plain NBD), nbdkit file.
    start_bg spid "$WAN" --name "$WNAME" exec src "$XNBD" -r -W 10.254.0.1:10810 -l 10.254.0.1:10809 \
        -p "$tmp/src-xnbd.pid" "$img" 2>"$tmp/src-xnbd.log"
    start_bg kpid "$WAN" --name "$WNAME" exec src nbdkit -f -r -i 10.254.0.1 -p 10811 \
        --pidfile "$tmp/src-nbdkit.pid" file "$img" 2>"$tmp/src-nbdkit.log"
    wait_file_ready "$tmp/src-xnbd.pid" "$spid" 10 || die "xnbd-server in src did not start: $(cat "$tmp/src-xnbd.log")"
    wait_file_ready "$tmp/src-nbdkit.pid" "$kpid" 10 || die "nbdkit in src did not start: $(cat "$tmp/src-nbdkit.log")"
    a_wan=$(wan relay-addr 10810) a_nbd=$(wan relay-addr 10809) a_kit=$(wan relay-addr 10811)
    common=("$setting" "$rtt_s" "$rate_bps" "$mode_line")

    if want xnbd-zstd; then
        echo "  xnbd-zstd: xnbd-proxy --cache-all, xnbd://$a_wan/"
        run_xnbd xnbd-zstd "xnbd://$a_wan/"
        verify="not checked"
        if [[ $R_TIME =~ ^[0-9.]+$ ]]; then
            cmp -s "$img" "$tmp/xnbd-zstd.img" && verify="identical to the image" || verify="DIFFERS from the image"
        fi
        rm -f "$tmp/xnbd-zstd.img" "$tmp/xnbd-zstd.bm"
        record copy "${common[@]}" xnbd-zstd "$R_TIME" "$R_LINK" "$lim_z" "cache $verify; $R_NOTE"
        echo "    $R_TIME s, link $R_LINK B"
    fi
    if want xnbd-plain; then
        echo "  xnbd-plain: xnbd-proxy --cache-all, nbd://$a_nbd/"
        run_xnbd xnbd-plain "nbd://$a_nbd/"
        rm -f "$tmp/xnbd-plain.img" "$tmp/xnbd-plain.bm"
        record copy "${common[@]}" xnbd-plain "$R_TIME" "$R_LINK" "$lim_p" "$R_NOTE"
        echo "    $R_TIME s, link $R_LINK B"
    fi
    if want nbdcopy; then
        echo "  nbdcopy: nbd://$a_kit/ (nbdkit file) to a file"
        run_nbdcopy "$a_kit"
        record copy "${common[@]}" nbdcopy "$R_TIME" "$R_LINK" "$lim_p" "$R_NOTE"
        echo "    $R_TIME s, link $R_LINK B"
    fi
    if want nbdkit; then
        echo "  nbdkit: scan+cow filters over nbd://$a_kit/ (nbdkit file)"
        run_nbdkit "$a_kit"
        record copy "${common[@]}" nbdkit "$R_TIME" "$R_LINK" "$lim_p" "$R_NOTE"
        echo "    $R_TIME s, link $R_LINK B"
    fi
    if want lat; then
        echo "  on-demand latency, idle proxy"
        run_lat lat-idle "$tmp/lat-idle.off" "xnbd://$a_wan/"
        record lat "${common[@]}" idle "$L_RESULT" "$L_MISSES" "$L_STATE"
        echo "    $L_RESULT (on-demand fetches $L_MISSES)"
        echo "  on-demand latency, during the background copy"
        run_lat lat-copy "$tmp/lat-copy.off" "xnbd://$a_wan/" --cache-all
        record lat "${common[@]}" copy "$L_RESULT" "$L_MISSES" "$L_STATE"
        echo "    $L_RESULT (on-demand fetches $L_MISSES, proxy $L_STATE)"
        echo "  on-demand latency, from the start of the background copy"
        LAT_AT_START=1 run_lat lat-start "$tmp/lat-copy.off" "xnbd://$a_wan/" --cache-all
        record lat "${common[@]}" start "$L_RESULT" "$L_MISSES" "$L_STATE"
        echo "    $L_RESULT (on-demand fetches $L_MISSES, proxy $L_STATE)"
    fi
    stop_all
    wan down >/dev/null || echo "$ME: wan-emu down failed" >&2
    wan_up=0
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- Tables
python3 - "$results" "$SIZE_MIB" "$SEED" "$NONZERO" "$ZSTD_BYTES" "$ZSTD_LEVEL" \
    "$LAT_N" "$CAP" "$load_before" "$load_after" "$(nproc)" "$QUICK" > "$tmp/table.txt" <<'PY'
import re, sys, time
(path, size_mib, seed, nonzero, zbytes, level, lat_n, cap, load0, load1, ncpu,
 quick) = sys.argv[1:]
nonzero, zbytes = int(nonzero), int(zbytes)
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
settings = []
for r in rows:
    if r[1] not in settings:
        settings.append(r[1])
NAMES = {
    "xnbd-zstd": "xnbd-proxy, xnbd:// zstd %s" % level,
    "xnbd-plain": "xnbd-proxy, nbd:// plain",
    "nbdcopy": "nbdcopy from nbdkit file",
    "nbdkit": "nbdkit scan+cow+nbd proxy",
}
def num(t):
    return float(t) if re.fullmatch(r"[0-9.]+", t) else None
print("WAN migration benchmark, %s, %s CPUs, load average before %s, after %s%s"
      % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), ncpu, load0, load1,
         " (BENCH_QUICK)" if quick == "1" else ""))
print("image: gen-image.py %s MiB seed %s (40%% random, 30%% zero holes, 30%% text);"
      " non-zero blocks %d B; zstd -%s of them %d B (%.3f)"
      % (size_mib, seed, nonzero, level, zbytes, zbytes / nonzero))
print("limit = bytes that must cross / rate + 2 x RTT: the zstd size for xnbd://, the"
      " non-zero bytes for the others")
print("link = rx+tx bytes of the dst veth (ip -s link: frames, headers included);"
      " tbf counts frames, so TCP payload")
print("       gets at most ~95.6% of the rate: about 1.05 x limit is the floor for any copy")
print("targets: xnbd-proxy xnbd:// <= 1.15 x its limit and faster than both peers;"
      " on-demand p50 <= RTT + 2 ms idle, p99 <= 2 x RTT + 4 KiB / rate + 5 ms during the copy"
      " (from 1/12 in: copy; from its first moment: start)")
for s in settings:
    srows = [r for r in rows if r[1] == s]
    rtt, rate, mode = float(srows[0][2]), int(srows[0][3]), srows[0][4]
    print()
    print("== RTT %g ms, %g Mbit/s  (wan-emu %s)" % (rtt * 1e3, rate / 1e6, mode))
    print("%-28s | %9s | %9s | %8s | %10s | %s" % ("copy", "time s", "link MB", "limit s",
                                                  "time/limit", "target"))
    times = {}
    notes = []
    for r in srows:
        if r[0] != "copy":
            continue
        run, t, link, lim, note = r[5], r[6], int(r[7]), float(r[8]), r[9]
        v = num(t)
        times[run] = v if v is not None else (float(cap) if t.startswith(">") else None)
        ratio = "%.2f" % (v / lim) if v else ("> %.2f" % (float(cap) / lim) if t.startswith(">") else "-")
        target = ""
        if run == "xnbd-zstd" and v:
            target = "<= 1.15: %s" % ("met" if v / lim <= 1.15 else "MISSED")
        print("%-28s | %9s | %9.1f | %8.2f | %10s | %s" % (NAMES.get(run, run), t, link / 1e6, lim,
                                                          ratio, target))
        notes.append("  %s: %s" % (run, note))
    x = times.get("xnbd-zstd")
    peers = {k: v for k, v in times.items() if k in ("nbdcopy", "nbdkit")}
    if x and peers:
        beat = all(v is not None and x < v for v in peers.values())
        print("xnbd-zstd faster than %s: %s" % (" and ".join(sorted(peers)),
                                                "yes" if beat else "NO"))
    for r in srows:
        if r[0] != "lat":
            continue
        kind, res, misses, state = r[5], r[6], r[7], r[8]
        m = dict(re.findall(r"(\w+)=(\d+)", res))
        if "p50_us" in m:
            p50, p99 = int(m["p50_us"]) / 1e3, int(m["p99_us"]) / 1e3
            if kind == "idle":
                tgt = rtt * 1e3 + 2
                verdict = "p50 target <= %.0f ms: %s" % (tgt, "met" if p50 <= tgt else "MISSED")
            else:               # 2 RTT + its own 4 KiB on the link + 5 ms
                tgt = 2 * rtt * 1e3 + 4096 * 8 / rate * 1e3 + 5
                verdict = "p99 target <= %.1f ms: %s" % (tgt, "met" if p99 <= tgt else "MISSED")
            left = re.search(r"\((.*)\)$", res)
            print("on-demand 4 KiB miss, %-10s p50 %7.1f ms  p90 %7.1f ms  p99 %7.1f ms  max %7.1f ms"
                  "  | %s  (%s misses timed%s; the proxy counted %s on-demand fetches; then %s)"
                  % (kind + ":", p50, int(m["p90_us"]) / 1e3, p99, int(m["max_us"]) / 1e3,
                     verdict, m.get("n"), ", " + left.group(1) if left else "", misses, state))
        else:
            print("on-demand 4 KiB miss, %-10s %s" % (kind + ":", res))
    if notes:
        print("details:")
        print("\n".join(notes))
PY
tee "$OUT" < "$tmp/table.txt"
echo "migrate: table saved to $OUT; proxy status traces in $TRACE"
