#!/usr/bin/env bash
# xnbd demo: migrate a disk from site A to site B while a client uses it.
#
#   scripts/demo.sh               installs missing Debian packages, builds, runs
#   DEMO_WAN=no scripts/demo.sh   loopback only, even where the WAN emulator works
#   DEMO_WAN=yes scripts/demo.sh  fail instead of falling back to loopback
#   DEMO_RTT=50ms DEMO_RATE=100mbit scripts/demo.sh   another emulated WAN
#   DEMO_KEEP=1 scripts/demo.sh   keep the temporary directory for inspection
#
# What happens:
#   1. A deterministic 256 MiB disk image (random, text, written-zero and
#      never-written blocks) is the disk of a VM at site A.
#   2. Site A: xnbd-server serves it over NBD (the VM, here qemu-io, writes
#      to it) and over the WAN transport (NBD in zstd) for site B.
#   3. Site B: xnbd-proxy serves the same disk at once.  A client (qemu-io,
#      qemu-img) reads and writes through it WHILE the background copy runs;
#      every write is mirrored into a model file.
#   4. xnbd-ctl finishes the copy, detaches, and site A is switched off.
#   5. B's disk must equal the model byte for byte; A's image must be exactly
#      what the VM left there (the proxy never writes to the source).
#
# Sites A and B are two network namespaces joined by an emulated WAN
# (scripts/wan-emu/wan-emu: 20 ms RTT, 200 Mbit/s) when that works here
# (root, ip netns, tc); otherwise both run on 127.0.0.1 and the demo says so.
# Only loopback and the emulator's private namespaces are used.  Everything
# it started is stopped (by PID), the emulator taken down and the temporary
# directory removed on every exit path.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
BUILD=$REPO/build
SERVER=$BUILD/xnbd-server
PROXY=$BUILD/xnbd-proxy
CTL=$BUILD/xnbd-ctl
WANEMU=$REPO/scripts/wan-emu/wan-emu
IMAGE_MIB=256
BLOCK=4096
SEED=20240611
RTT=${DEMO_RTT:-20ms}
RATE=${DEMO_RATE:-200mbit}
WAN_NAME=xdemo$$

tmp=
wan=0          # 1: the emulated WAN is up
wan_up=0       # 1: cleanup must take it down
server_pid=
proxy_pid=
started=$(date +%s.%N)

# ---- helpers -----------------------------------------------------------------

if [[ -t 1 ]]; then bold=$'\033[1m' green=$'\033[1;32m' plain=$'\033[0m'; else bold='' green='' plain=''; fi
step_no=0
step() {
    step_no=$((step_no + 1))
    printf '\n%s== %d. %s%s\n' "$bold" "$step_no" "$*" "$plain"
}
die() { echo "demo: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
# Prints a command the way a user would type it: long arguments quoted,
# the repository's path left out, the temporary directory shown as $T.
show() {
    local a shown=()
    for a in "$@"; do
        a=${a//"$REPO/"/}
        if [[ ! $a =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then a="'$a'"; fi
        [[ -n $tmp ]] && a=${a//"$tmp"/\$T}
        shown+=("$a")
    done
    printf '%s$ %s\n' "${prompt-}" "${shown[*]}"
}
# The same for a command run at site A or B: "siteA$ ...".
show_at() { local prompt="site$1"; shift; show "$@"; }
runctl() { show_at B xnbd-ctl -c "$ctlsock" "$@"; ctl "$@"; }

# Where a command runs: site A (the source) or site B (the destination).
# With the emulated WAN these are the two namespaces; on loopback, here.
site_cmd() {  # site_cmd a|b VAR: VAR=(prefix to run a command at that site)
    local -n _out=$2
    _out=()
    if (( wan )); then
        _out=("$WANEMU" --name "$WAN_NAME" exec "$([[ $1 == a ]] && echo src || echo dst)")
    fi
}
at_a() { local p; site_cmd a p; "${p[@]}" "$@"; }
at_b() { local p; site_cmd b p; "${p[@]}" "$@"; }

# Stops a process we started (by PID), gracefully, then by force.
stop_pid() {  # stop_pid PID NAME; returns its exit status
    local pid=$1 name=$2 status=0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "demo: $name ($pid) still running 10 s after SIGTERM; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || status=$?
    return "$status"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [[ -n $proxy_pid ]] && { stop_pid "$proxy_pid" xnbd-proxy || true; }
    [[ -n $server_pid ]] && { stop_pid "$server_pid" xnbd-server || true; }
    if (( wan_up )); then
        "$WANEMU" --name "$WAN_NAME" down >/dev/null 2>&1 ||
            echo "demo: 'wan-emu --name $WAN_NAME down' failed; run it by hand" >&2
    fi
    if (( rc != 0 )) && [[ -n $tmp ]]; then
        local f
        for f in "$tmp"/server.log "$tmp"/proxy.log "$tmp"/wan-up.log; do
            [[ -s $f ]] || continue
            echo "demo: last lines of $(basename "$f"):" >&2
            tail -n 15 "$f" | sed 's/^/    /' >&2
        done
    fi
    if [[ -n $tmp && -d $tmp ]]; then
        if [[ -n ${DEMO_KEEP-} ]]; then echo "demo: kept $tmp"; else rm -rf "$tmp"; fi
    fi
    (( rc == 0 )) || echo "demo: FAILED (exit status $rc)" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_bg VAR NAME LOG PIDFILE SITE CMD...: starts CMD at SITE in the
# background, waits until it has written PIDFILE (it is ready then), and
# stores its PID in VAR.
start_bg() {
    local -n _pid=$1
    local name=$2 log=$3 pidfile=$4 site=$5 p bg
    shift 5
    site_cmd "$site" p
    show_at "${site^^}" "$@"
    # wan-emu exec ends in exec, so $! is the program's own PID.
    "${p[@]}" "$@" >"$log" 2>&1 &
    bg=$!
    _pid=$bg
    for _ in $(seq 300); do
        [[ -s $pidfile ]] && break
        if ! kill -0 "$bg" 2>/dev/null; then
            _pid=
            wait "$bg" || true
            die "$name exited during start-up (see its log below)"
        fi
        sleep 0.1
    done
    [[ -s $pidfile ]] || die "$name did not write $pidfile within 30 s"
    [[ $(cat "$pidfile") == "$bg" ]] || die "$name: pid file says $(cat "$pidfile"), started $bg"
}
check_alive() {  # check_alive PID NAME
    kill -0 "$1" 2>/dev/null || die "$2 is no longer running"
}

# The control socket: xnbd-ctl, or the line protocol with socat if
# xnbd-ctl has not been built.
ctl() {
    if [[ -x $CTL ]]; then
        "$CTL" --control "$ctlsock" "$@"
        return
    fi
    local reply
    case "$1 ${2-}" in
        "status --json") reply=$(ctl_line status); echo "$reply" ;;
        "cache-all --progress") ctl_line cache-all >/dev/null
            while :; do
                reply=$(ctl_line status)
                python3 "$tmp/demo.py" progress <<< "$reply" && break
                sleep 2
            done ;;
        *) reply=$(ctl_line "$*"); echo "$reply"
           [[ $reply == '{"ok":true'* ]] ;;
    esac
}
ctl_line() { printf '%s\n' "$1" | socat -t 60 - UNIX-CONNECT:"$ctlsock"; }
status_json() { ctl status --json > "$1"; }
# jget FILE KEY.KEY...: one member of a JSON file.
jget() { python3 "$tmp/demo.py" get "$@"; }

# Compares [OFF, OFF+LEN) of the model with the proxy's export.
compare_range() {  # compare_range OFF LEN
    local model_r proxy_r
    model_r="json:{\"driver\":\"raw\",\"offset\":$1,\"size\":$2,\"file\":{\"driver\":\"file\",\"filename\":\"$model\"}}"
    proxy_r="json:{\"driver\":\"raw\",\"offset\":$1,\"size\":$2,\"file\":{\"driver\":\"nbd\",\"server\":{\"type\":\"inet\",\"host\":\"127.0.0.1\",\"port\":\"$proxy_port\"}}}"
    at_b qemu-img compare -q "$model_r" "$proxy_r"
}

# ---- 1. dependencies, build ---------------------------------------------------

step "Install missing Debian packages and build"
scripts/install-deps.sh
make -s
for p in "$SERVER" "$PROXY"; do [[ -x $p ]] || die "$p was not built"; done
for tool in qemu-io qemu-img python3 cmp sha256sum ss socat; do
    command -v "$tool" >/dev/null || die "$tool not found (run scripts/install-deps.sh)"
done
[[ -x $CTL ]] || echo "  (build/xnbd-ctl is not built: talking to the control socket with socat)"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/xnbd-demo.XXXXXX")
disk=$tmp/siteA-disk.img       # the VM's disk at site A
model=$tmp/model.img           # what the disk must contain, kept up to date here
cache=$tmp/siteB-disk.img      # the proxy's local copy at site B
bitmap=$tmp/siteB-disk.bitmap
ctlsock=$tmp/proxy.ctl
size=$((IMAGE_MIB * 1024 * 1024))
echo "  T=$tmp  (the demo's files)"

cat > "$tmp/demo.py" <<'PY'
# Helpers for demo.sh: image generation, the client workload, the model,
# and reading JSON.
import json, random, sys

def gen(path, mib, block, seed):
    """Runs of 4 KiB blocks: holes (never written), written zeros, random
    data, text.  Same seed, same image, byte for byte."""
    rng = random.Random(seed)
    nblocks = mib * 1024 * 1024 // block
    counts = {"hole": 0, "zero": 0, "random": 0, "text": 0}
    with open(path, "wb") as f:
        f.truncate(nblocks * block)
        b = 0
        while b < nblocks:
            kind = rng.choices(["hole", "zero", "random", "text"], [30, 15, 35, 20])[0]
            n = min(rng.randint(1, 64), nblocks - b)
            if kind == "zero":
                f.seek(b * block); f.write(bytes(n * block))
            elif kind == "random":
                f.seek(b * block); f.write(rng.randbytes(n * block))
            elif kind == "text":
                f.seek(b * block)
                for i in range(b, b + n):
                    line = ("xnbd demo block %08d: the quick brown fox jumps over the lazy dog\n" % i).encode()
                    f.write((line * (block // len(line) + 1))[:block])
            counts[kind] += n
            b += n
    total = sum(counts.values())
    print("  %d blocks of %d bytes:" % (total, block), ", ".join(
        "%s %.1f%%" % (k, 100.0 * v / total) for k, v in counts.items()))

def ops(size, seed):
    """The client's writes at site B: whole blocks, partial blocks (the proxy
    must fetch the rest of the block first), block-straddling writes, large
    writes, zeroed ranges, and overwrites of earlier writes."""
    rng = random.Random(seed)
    out, K = [], 4096
    for i in range(40):
        kind = i % 5
        blk = rng.randrange(1, size // K - 300)
        pat = rng.randrange(1, 255)
        if kind == 0:   out.append(("write", pat, blk * K, K * rng.randint(1, 16)))
        elif kind == 1: out.append(("write", pat, blk * K + rng.randrange(1, K - 600), rng.randint(1, 500)))
        elif kind == 2: out.append(("write", pat, blk * K - rng.randint(1, 1024), rng.randint(1200, 3000)))
        elif kind == 3: out.append(("write", pat, blk * K, 1 << 20))
        else:           out.append(("zero", 0, blk * K, K * rng.randint(1, 64)))
    for i in range(4):                      # overwrite the middle of earlier writes
        _, _, off, ln = out[rng.randrange(len(out))]
        out.append(("write", rng.randrange(1, 255), off + ln // 4, max(1, ln // 2)))
    return out

def apply(model, opsfile):
    with open(model, "r+b") as f:
        for line in open(opsfile):
            kind, pat, off, ln = line.split()
            f.seek(int(off)); f.write(bytes([int(pat, 0)]) * int(ln))

def ranges(opsfile, size, seed):
    """What the client reads back during the copy: each write with 8 KiB
    around it, and untouched 256 KiB ranges (fetched on demand)."""
    rng = random.Random(seed)
    for line in open(opsfile):
        _, _, off, ln = line.split()
        a = max(0, int(off) - 8192) // 4096 * 4096
        b = min(size, (int(off) + int(ln) + 8192 + 4095) // 4096 * 4096)
        print(a, b - a)
    for _ in range(12):
        print(rng.randrange(0, size // 4096 - 64) * 4096, 256 * 1024)

def get(path, *keys):
    j = json.load(open(path))
    for k in keys:
        for part in k.split("."):
            j = j.get(part, {}) if isinstance(j, dict) else {}
        print(j if j != {} else "")

def mib(n):
    return "%.1f MiB" % (n / 1048576.0) if n >= 1048576 else "%.1f KiB" % (n / 1024.0)

def report(status, image_size, wire_sent, wire_recv, veth_rx, veth_tx):
    j = json.load(open(status))
    b, f = j["bytes"], j["fetches"]
    print("  image                    %s (%d blocks of %d bytes)" % (mib(j["image_size"]), j["blocks"]["total"], j["block_size"]))
    print("  zero blocks, not sent    %s (holes at A, known from block status; zeros written" % mib(b["zero_skipped"]))
    print("                           at A are data to block status: fetched, compressed to almost nothing)")
    print("  fetched from the source  %s  (%d on-demand fetches, %d background)" % (mib(b["fetched"]), f["ondemand"], f["background"]))
    if b.get("bridged"):
        print("  zeros read across        %s  (known-zero blocks inside larger background reads:" % mib(b["bridged"]))
        print("                           sent as holes, not written again, not in 'fetched')")
    if b.get("seeded") or j.get("dedup"):
        print("  copied from seeds at B   %s  (blocks already at site B, found by SHA-256 and" % mib(b.get("seeded", 0)))
        print("                           checked again before use; %s of digests crossed)" % mib(b.get("digests", 0)))
    print("  written by the client    %s  (stayed at site B)" % mib(b["local_written"]))
    if j.get("rtt_us"):
        print("  round trip to A          %.1f ms (measured by the proxy)" % (j["rtt_us"] / 1000.0))
    w = j.get("wire")
    if isinstance(w, dict) and w.get("rx"):
        print("  WAN transport, at B      in:  %s on the wire, %s of NBD replies after zstd (%.2fx)" % (
            mib(w["rx"]), mib(w["rx_raw"]), w["rx_raw"] / w["rx"]))
        print("   (xnbd-ctl status)       out: %s on the wire, %s of NBD requests before zstd" % (
            mib(w["tx"]), mib(w["tx_raw"])))
    if wire_sent:
        print("  TCP at A's WAN port      %s sent, %s received (payload bytes, from ss)" % (mib(int(wire_sent)), mib(int(wire_recv))))
    if veth_rx:
        print("  veth wan0 at site B      %s received, %s sent (whole frames, TCP/IP headers included)" % (mib(int(veth_rx)), mib(int(veth_tx))))

def progress(reply):
    j = json.loads(reply)
    print("  progress %.1f%%, state %s" % (100 * float(j["progress"]), j["state"]), file=sys.stderr)
    return j["blocks"]["missing"] == 0

cmd = sys.argv[1]
if cmd == "gen": gen(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
elif cmd == "ops":
    for o in ops(int(sys.argv[2]), int(sys.argv[3])): print("%s 0x%02x %d %d" % o)
elif cmd == "apply": apply(sys.argv[2], sys.argv[3])
elif cmd == "ranges": ranges(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
elif cmd == "get": get(sys.argv[2], *sys.argv[3:])
elif cmd == "report": report(sys.argv[2], int(sys.argv[3]), *sys.argv[4:8])
elif cmd == "progress": sys.exit(0 if progress(sys.stdin.read()) else 1)
PY

# qemu-io commands for an ops file (same lines python applies to the model).
qio_args() {  # qio_args OPSFILE -> QIO=(-c ... -c ...)
    QIO=()
    local kind pat off len
    while read -r kind pat off len; do
        if [[ $kind == zero ]]; then QIO+=(-c "write -z $off $len")
        else QIO+=(-c "write -P $pat $off $len"); fi
    done < "$1"
}

# ---- 2. the image --------------------------------------------------------------

step "Generate the VM's ${IMAGE_MIB} MiB disk at site A (deterministic: seed $SEED)"
python3 "$tmp/demo.py" gen "$disk" "$IMAGE_MIB" "$BLOCK" "$SEED"
cp --sparse=always "$disk" "$model"
echo "  $(du -h --apparent-size "$disk" | cut -f1) apparent, $(du -h "$disk" | cut -f1) allocated"

# ---- 3. the two sites -------------------------------------------------------------

step "Set up the two sites"
want=${DEMO_WAN:-auto}
why_not=
if [[ $want == no ]]; then
    why_not="DEMO_WAN=no"
elif (( EUID != 0 )); then
    why_not="not root (network namespaces need root)"
elif [[ ! -x $WANEMU ]]; then
    why_not="$WANEMU is missing"
else
    show "$WANEMU" --name "$WAN_NAME" up --rtt "$RTT" --rate "$RATE" --forward 10810
    wan_up=1
    if "$WANEMU" --name "$WAN_NAME" up --rtt "$RTT" --rate "$RATE" --forward 10810 >"$tmp/wan-up.log" 2>&1; then
        wan=1
        sed 's/^/  /' "$tmp/wan-up.log"
    else
        sed 's/^/  /' "$tmp/wan-up.log"
        why_not="wan-emu up failed (above)"
        "$WANEMU" --name "$WAN_NAME" down >/dev/null 2>&1 || true
        wan_up=0
    fi
fi
if (( wan )); then
    src_addr=$("$WANEMU" --name "$WAN_NAME" addr src)
    wan_target=$("$WANEMU" --name "$WAN_NAME" relay-addr 10810)
    echo "  MODE: emulated WAN, RTT $RTT, $RATE each way."
    echo "  Site A = namespace xnbd-$WAN_NAME-src ($src_addr), site B = xnbd-$WAN_NAME-dst;"
    echo "  B reaches A's WAN port at $wan_target.  Below, \"siteA\$ CMD\" runs CMD with"
    echo "  'wan-emu --name $WAN_NAME exec src CMD' (siteB\$: exec dst)."
else
    [[ $want == yes ]] && die "DEMO_WAN=yes but the emulated WAN is not available: $why_not"
    echo "  MODE: loopback (no emulated WAN: $why_not)."
    echo "  Both sites run on 127.0.0.1 (\"siteA\$\" and \"siteB\$\" below run here);"
    echo "  the timings say nothing about a WAN."
fi

# ---- 4. site A ----------------------------------------------------------------------

step "Site A: xnbd-server serves the disk (NBD for the VM, WAN transport for site B)"
if (( wan )); then
    start_bg server_pid xnbd-server "$tmp/server.log" "$tmp/server.pid" a \
        "$SERVER" --wan-listen "$src_addr:10810" --listen 127.0.0.1:10809 \
        --port-file "$tmp/server.port" --pidfile "$tmp/server.pid" "$disk"
    wan_port=10810
else
    start_bg server_pid xnbd-server "$tmp/server.log" "$tmp/server.pid" a \
        "$SERVER" --wan-listen 127.0.0.1:0 --wan-port-file "$tmp/server.wanport" \
        --listen 127.0.0.1:0 --port-file "$tmp/server.port" --pidfile "$tmp/server.pid" "$disk"
    wan_port=$(cat "$tmp/server.wanport")
    wan_target=127.0.0.1:$wan_port
fi
a_uri=nbd://127.0.0.1:$(cat "$tmp/server.port")
echo "  pid $server_pid; the VM's NBD: $a_uri; WAN port: $wan_port"

echo "  The VM runs at A and writes to its disk (qemu-io plays the VM):"
cat > "$tmp/opsA" <<EOF
write 0x5a 0 65536
write 0xa5 1000 5000
zero 0 $((200 * 1024 * 1024)) $((2 * 1024 * 1024))
write 0x3c $((size - 4096)) 4096
EOF
qio_args "$tmp/opsA"
show_at A qemu-io -f raw "${QIO[@]}" "$a_uri"
at_a qemu-io -f raw "${QIO[@]}" "$a_uri" > "$tmp/qio-a.out"
[[ $(grep -c '^wrote' "$tmp/qio-a.out") == 4 ]] || { cat "$tmp/qio-a.out"; die "qemu-io at A did not complete its writes"; }
echo "  4 writes done"
python3 "$tmp/demo.py" apply "$model" "$tmp/opsA"
echo "  (Here the hypervisor would live-migrate the VM's memory to B; the VM stops at A.)"
src_sha=$(sha256sum < "$disk")
check_alive "$server_pid" xnbd-server

# ---- 5. site B -----------------------------------------------------------------------

step "Site B: xnbd-proxy serves the disk at once, fetching blocks from A"
veth0_rx=0 veth0_tx=0
if (( wan )); then
    veth0_rx=$(at_b cat /sys/class/net/wan0/statistics/rx_bytes)
    veth0_tx=$(at_b cat /sys/class/net/wan0/statistics/tx_bytes)
fi
migration_start=$(now)
start_bg proxy_pid xnbd-proxy "$tmp/proxy.log" "$tmp/proxy.pid" b \
    "$PROXY" --target "xnbd://$wan_target/" --cache "$cache" --bitmap "$bitmap" \
    --control "$ctlsock" --listen 127.0.0.1:0 --port-file "$tmp/proxy.port" \
    --pidfile "$tmp/proxy.pid"
proxy_port=$(cat "$tmp/proxy.port")
b_uri=nbd://127.0.0.1:$proxy_port
echo "  pid $proxy_pid; B's hypervisor connects to $b_uri (started in $(since "$migration_start") s)"
if [[ -x $CTL ]]; then runctl status | sed -n '1,3p;10,12p'; fi

echo
echo "  Detaching now would lose data, so it is refused:"
show_at B xnbd-ctl -c "$ctlsock" detach
if ctl detach; then die "detach was accepted with blocks missing"; fi

echo
echo "  A read of a missing block is fetched on demand (one WAN round trip);"
echo "  the second read of it is local:"
od_off=$((130 * 1024 * 1024 + 12288))
for i in 1 2; do
    show_at B qemu-io -f raw -c "read $od_off 4096" "$b_uri"
    at_b qemu-io -f raw -c "read $od_off 4096" "$b_uri" | sed -n 's/^.*ops; \([0-9:.]* sec\).*/  read 4 KiB in \1/p'
done
compare_range "$od_off" 4096 || die "the block read on demand differs from the model"

# ---- 6. client I/O during the background copy ---------------------------------------------

step "Start the background copy (capped at 100 Mbit/s for now) and use the disk meanwhile"
runctl rate 100mbit
runctl cache-all
sleep 0.5
status_json "$tmp/st-before.json"
p_before=$(jget "$tmp/st-before.json" progress)

python3 "$tmp/demo.py" ops "$size" "$SEED" > "$tmp/opsB"
qio_args "$tmp/opsB"
nops=$(wc -l < "$tmp/opsB")
echo "  The client writes $nops times: whole blocks, partial blocks of missing blocks"
echo "  (fetched first), block-straddling, 1 MiB, zeroed ranges, overwrites:"
show_at B qemu-io -f raw "${QIO[@]:0:6}" ... "$b_uri"
t0=$(now)
at_b qemu-io -f raw "${QIO[@]}" "$b_uri" > "$tmp/qio-b.out"
[[ $(grep -c '^wrote' "$tmp/qio-b.out") == "$nops" ]] || { cat "$tmp/qio-b.out"; die "qemu-io did not complete every write"; }
python3 "$tmp/demo.py" apply "$model" "$tmp/opsB"
echo "  $nops writes done in $(since "$t0") s; the same writes applied to the model"

python3 "$tmp/demo.py" ranges "$tmp/opsB" "$size" "$SEED" > "$tmp/ranges"
nr=$(wc -l < "$tmp/ranges")
echo "  Reading back $nr ranges (each write with 8 KiB around it, and untouched"
echo "  ranges) and comparing them with the model:"
t0=$(now)
while read -r off len; do
    compare_range "$off" "$len" || die "range $off+$len read through the proxy differs from the model"
done < "$tmp/ranges"
echo "  all $nr ranges equal the model ($(since "$t0") s)"
status_json "$tmp/st-after.json"
p_after=$(jget "$tmp/st-after.json" progress)
[[ $(jget "$tmp/st-after.json" blocks.missing) -gt 0 ]] ||
    echo "  (note: the copy had already finished; the client I/O did not overlap it)"
awk -v a="$p_before" -v b="$p_after" 'BEGIN { printf "  the background copy was at %.1f%% when the client started and %.1f%% when it finished\n", 100 * a, 100 * b }'
check_alive "$proxy_pid" xnbd-proxy
check_alive "$server_pid" xnbd-server

# ---- 7. finish, detach, switch A off ---------------------------------------------------------

step "Lift the cap, wait for the copy, detach, switch site A off"
copy_start=$(now)
runctl rate 0
show_at B xnbd-ctl -c "$ctlsock" cache-all --progress --wait
if [[ -x $CTL ]]; then ctl cache-all --progress --wait; else ctl cache-all --progress; fi
echo "  copy finished $(since "$copy_start") s after the cap was lifted"
# What crossed the WAN, read at A before the connections close.
wire=$(at_a ss -tinH state established "( sport = :$wan_port )" |
       awk '{ for (i = 1; i <= NF; i++) { if ($i ~ /^bytes_sent:/) { split($i, a, ":"); s += a[2] }
              if ($i ~ /^bytes_received:/) { split($i, a, ":"); r += a[2] } } }
            END { printf "%d %d", s, r }')
read -r wire_sent wire_recv <<< "$wire"
runctl detach
status_json "$tmp/st-final.json"
migration_time=$(since "$migration_start")
[[ $(jget "$tmp/st-final.json" state) == detached ]] || die "state is $(jget "$tmp/st-final.json" state) after detach, not detached"
veth_rx= veth_tx=
if (( wan )); then
    veth_rx=$(( $(at_b cat /sys/class/net/wan0/statistics/rx_bytes) - veth0_rx ))
    veth_tx=$(( $(at_b cat /sys/class/net/wan0/statistics/tx_bytes) - veth0_tx ))
fi
echo "  site A is switched off:"
show_at A kill -TERM "$server_pid"
status=0
stop_pid "$server_pid" xnbd-server || status=$?
server_pid=
(( status == 0 )) || die "xnbd-server exited with status $status after SIGTERM"

# ---- 8. verify ----------------------------------------------------------------------------------

step "Verify: B's disk equals the model; A's image is what the VM left there"
show_at B qemu-img compare -f raw -F raw "$model" "$b_uri"
at_b qemu-img compare -f raw -F raw "$model" "$b_uri" | sed 's/^/  /'
[[ $(sha256sum < "$disk") == "$src_sha" ]] || die "the source image changed: the proxy wrote to it"
echo "  site A's image is unchanged since the VM stopped there (sha256)"
status=0
show_at B kill -TERM "$proxy_pid"
stop_pid "$proxy_pid" xnbd-proxy || status=$?
proxy_pid=
(( status == 0 )) || die "xnbd-proxy exited with status $status after SIGTERM"
show_at B cmp "$model" "$cache"
cmp "$model" "$cache"
echo "  B's cache image is the complete disk"

echo
echo "  Restarted with a complete bitmap, the proxy needs no source at all:"
start_bg proxy_pid xnbd-proxy "$tmp/proxy.log" "$tmp/proxy.pid" b \
    "$PROXY" --cache "$cache" --bitmap "$bitmap" --control "$ctlsock" \
    --listen 127.0.0.1:0 --port-file "$tmp/proxy.port" --pidfile "$tmp/proxy.pid"
proxy_port=$(cat "$tmp/proxy.port")
b_uri=nbd://127.0.0.1:$proxy_port
status_json "$tmp/st-restart.json"
echo "  state: $(jget "$tmp/st-restart.json" state)"
at_b qemu-img compare -f raw -F raw "$model" "$b_uri" | sed 's/^/  /'
stop_pid "$proxy_pid" xnbd-proxy || die "xnbd-proxy did not stop cleanly"
proxy_pid=

# ---- 9. what crossed the link -----------------------------------------------------------------

step "What crossed the link"
python3 "$tmp/demo.py" report "$tmp/st-final.json" "$size" "$wire_sent" "$wire_recv" "$veth_rx" "$veth_tx"
if (( wan )); then mode="an emulated WAN ($RTT RTT, $RATE)"; else mode="loopback (no WAN emulation)"; fi
echo "  migration                $migration_time s from starting the proxy to detach, over $mode"

printf '\n%sPASS%s  a %d MiB disk moved from site A to site B over %s\n' "$green" "$plain" "$IMAGE_MIB" "$mode"
printf '      while a client wrote and read through the proxy; B equals the model,\n'
printf '      A was never written by the proxy (%s s in all).\n' "$(since "$started")"
