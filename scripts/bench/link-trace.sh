#!/usr/bin/env bash
# link-trace.sh: where a migration's link idles.  One xnbd migration of
# IMAGE over an emulated WAN (scripts/wan-emu/wan-emu), with the rx bytes
# of the destination's veth sampled every 4 ms; prints the link's rate per
# bucket, and the copy's time from the proxy's exec to its completed_at.
# A diagnostic, not a benchmark: it found session 12's start-up and
# window problems that the totals of dedup.sh only hinted at.
#
#   scripts/bench/link-trace.sh BUILDDIR IMAGE [XNBD-PROXY OPTIONS...]   (as root)
#
# e.g.  scripts/bench/link-trace.sh build /var/cache/xnbd-bench/vm/vm2.ram \
#           --seed /var/cache/xnbd-bench/vm/vm1.ram
#
# The source is xnbd-server -r --image-id=stat (nothing written beside the
# image) in the src namespace, read over xnbd:// (zstd 3); the proxy runs
# with --cache-all, its cache and bitmap in a scratch directory.
#
# Environment:
#   LINK_TRACE_SETTING    RTT:RATE of the emulated link (default 20ms:200mbit)
#   LINK_TRACE_BUCKET_MS  bucket of the printed rates (default 50)
#   LINK_TRACE_CAP        seconds after which the copy is given up (default 300)
#   LINK_TRACE_KEEP       a directory to keep the samples, logs, status and t0 (the exec stamp) in
#   LINK_TRACE_SERVER_OPTS more xnbd-server options (e.g. -v: its debug log,
#                         each digest read's hashing time among it)
#   BENCH_TMPDIR          scratch directory (default /dev/shm, else /tmp)
#   XNBD_TRACE_COPY=1     (passed on to the proxy) the copy's state in its
#                         log at most every 5 ms and at each fill that starts
#                         jobs: cursor, digests in/asked, bytes in flight,
#                         window, seed bytes being checked, fetched, seeded
#                         (keep the log with LINK_TRACE_KEEP)
set -euo pipefail

ME=link-trace
die() { echo "$ME: $*" >&2; exit 1; }

(( $# >= 2 )) || die "usage: $0 BUILDDIR IMAGE [XNBD-PROXY OPTIONS...]"
B=$(cd "$1" 2>/dev/null && pwd) || die "no build directory '$1' (run make first)"
IMAGE=$(readlink -f "$2") || die "no image '$2'"
shift 2
[[ -f $IMAGE && -r $IMAGE ]] || die "image $IMAGE is not a readable file"
for x in xnbd-server xnbd-proxy xnbd-ctl wan-relay; do
    [[ -x $B/$x ]] || die "$B/$x is missing (run make)"
done
(( EUID == 0 )) || die "needs root (network namespaces)"
SETTING=${LINK_TRACE_SETTING:-20ms:200mbit}
[[ $SETTING =~ ^([0-9.]+(ms|us|s)?):([0-9.]+[kmg]?bit)$ ]] ||
    die "LINK_TRACE_SETTING must look like 20ms:200mbit, not '$SETTING'"
BUCKET=${LINK_TRACE_BUCKET_MS:-50}
[[ $BUCKET =~ ^[1-9][0-9]{0,4}$ ]] || die "LINK_TRACE_BUCKET_MS must be 1-99999, not '$BUCKET'"
CAP=${LINK_TRACE_CAP:-300}
[[ $CAP =~ ^[1-9][0-9]{0,4}$ ]] || die "LINK_TRACE_CAP must be 1-99999 seconds, not '$CAP'"

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WAN=$HERE/../wan-emu/wan-emu
WNAME=ltrace
PORT=10830
export XNBD_BUILD=$B
scratch=${BENCH_TMPDIR:-}
[[ -z $scratch && -d /dev/shm ]] && scratch=/dev/shm
tmp=$(mktemp -d "${scratch:-${TMPDIR:-/tmp}}/xnbd-link-trace.XXXXXX")
PIDS=()
wan_up=0

cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    (( wan_up )) && "$WAN" --name "$WNAME" down >/dev/null 2>&1
    if [[ -n ${LINK_TRACE_KEEP:-} ]]; then
        mkdir -p "$LINK_TRACE_KEEP" && cp "$tmp"/*.log "$tmp"/*.txt "$tmp"/status.json "$tmp"/t0 \
            "$LINK_TRACE_KEEP"/ 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# wait_for FILE SECONDS: until FILE exists and is not empty (bounded).
wait_for() {
    local i
    for (( i = 0; i < $2 * 50; i++ )); do
        [[ -s $1 ]] && return 0
        sleep 0.02
    done
    return 1
}

out=$("$WAN" --name "$WNAME" up --rtt "${SETTING%%:*}" --rate "${SETTING#*:}" \
      --forward "$PORT" 2>&1) || die "wan-emu up failed: $out"
wan_up=1
echo "$ME: $(grep -m1 '^wan-emu: mode' <<< "$out" || echo "wan-emu up") ($SETTING)"

cat "$IMAGE" > /dev/null          # the source reads from the page cache
# shellcheck disable=SC2086
"$WAN" --name "$WNAME" exec src "$B/xnbd-server" -r --image-id=stat ${LINK_TRACE_SERVER_OPTS:-} \
    -W "10.254.0.1:$PORT" -l 127.0.0.1:0 -p "$tmp/server.pid" "$IMAGE" 2> "$tmp/server.log" &
PIDS+=("$!")
wait_for "$tmp/server.pid" 10 || die "xnbd-server did not start: $(tail -3 "$tmp/server.log")"
addr=$("$WAN" --name "$WNAME" relay-addr "$PORT")

# The sampler: rx bytes of wan0 in dst every 4 ms, until told to stop.
"$WAN" --name "$WNAME" exec dst python3 - "$tmp/link.txt" "$tmp/stop" "$CAP" <<'PY' &
import os, sys, time
out, stop, cap = open(sys.argv[1], "w"), sys.argv[2], float(sys.argv[3]) + 30
f = open("/sys/class/net/wan0/statistics/rx_bytes")
end = time.time() + cap
while time.time() < end and not os.path.exists(stop):
    f.seek(0)
    out.write("%.6f %s\n" % (time.time(), f.read().strip()))
    time.sleep(0.004)
out.close()
PY
PIDS+=("$!")
wait_for "$tmp/link.txt" 10 || die "the link sampler did not start"

# The clock starts at the proxy's exec inside dst.
STAMP_EXEC='t=$EPOCHREALTIME; printf "%s\n" "$t" > "$1"; shift; exec "$@"'
"$WAN" --name "$WNAME" exec dst bash -c "$STAMP_EXEC" stamp "$tmp/t0" \
    "$B/xnbd-proxy" --target "xnbd://$addr/" --cache "$tmp/cache.img" \
    --bitmap "$tmp/cache.bm" --control "$tmp/ctl" -u "$tmp/sock" --cache-all "$@" \
    2> "$tmp/proxy.log" &
PIDS+=("$!")
ppid=$!
# Polled with xnbd-ctl and a bash match, nothing else: a Python start-up
# per poll (and pyenv's shell shim, where python3 is one) took ~0.75 of
# this machine's two cores and slowed the copy it timed by 10-30 %.
done_at=
for (( i = 0; i < CAP * 20; i++ )); do
    kill -0 "$ppid" 2>/dev/null || die "xnbd-proxy exited: $(tail -3 "$tmp/proxy.log")"
    if [[ -S $tmp/ctl ]] && st=$("$B/xnbd-ctl" -c "$tmp/ctl" status --json 2>/dev/null) &&
       [[ $st =~ \"completed_at\":\ *([0-9.]+) ]]; then
        done_at=${BASH_REMATCH[1]}
        printf '%s\n' "$st" > "$tmp/status.json"
        break
    fi
    sleep 0.05
done
[[ -n $done_at ]] || die "the copy did not complete in $CAP s"
touch "$tmp/stop"
cmp -s "$IMAGE" "$tmp/cache.img" && verdict="cache identical to the image" ||
    verdict="cache DIFFERS from the image"

python3 - "$tmp/link.txt" "$(cat "$tmp/t0")" "$done_at" "$BUCKET" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
rows = [(float(a), int(b)) for a, b in rows if b.isdigit()]
t0, done, bucket = float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]) / 1000.0
if not rows:
    sys.exit("link-trace: no link samples")
# The counts at the proxy's exec and at completion: the last samples before.
base = max([v for t, v in rows if t <= t0] or [rows[0][1]])
at_done = max([v for t, v in rows if t <= done] or [base])
print("copy: %.3f s from the proxy's exec to completed_at; %.1f MB received on the link"
      % (done - t0, (at_done - base) / 1e6))
# Rate per bucket: the bytes between the last samples at or before each edge.
k, prev, i, line = 0, base, 0, []
while t0 + k * bucket < done + bucket:
    edge, v = t0 + (k + 1) * bucket, prev
    while i < len(rows) and rows[i][0] <= edge:
        if rows[i][0] >= t0:
            v = rows[i][1]
        i += 1
    line.append("%5.0f:%5.1f" % (k * bucket * 1000, (v - prev) / bucket / 1e6))
    prev = v
    k += 1
print("link rx MB/s per %d ms from the proxy's exec (ms:MB/s):" % int(bucket * 1000))
for j in range(0, len(line), 8):
    print("  " + "  ".join(line[j:j + 8]))
PY
echo "$ME: $verdict; proxy log, status and samples: set LINK_TRACE_KEEP=DIR to keep them"
