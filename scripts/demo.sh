#!/usr/bin/env bash
# xnbd demo: serve a disk image with the just-built xnbd-server and use it
# with standard NBD clients (nbdinfo, qemu-io, nbdcopy, qemu-img).
#
#   scripts/demo.sh             installs missing Debian packages, builds, runs
#   DEMO_KEEP=1 scripts/demo.sh keep the temporary directory for inspection
#
# Everything happens in a private temporary directory, over a private unix
# socket and an ephemeral port on 127.0.0.1; the server and the directory are
# removed on every exit path.  (Once xnbd-proxy exists this demo becomes a
# live migration between two sites.)
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
SERVER=$REPO/build/xnbd-server
IMAGE_MIB=256
BLOCK=4096
SEED=20240611

tmp=
server_pid=
started=$(date +%s.%N)

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    if (( rc != 0 )) && [[ -n $tmp && -s $tmp/server.log ]]; then
        echo "demo: last lines of the xnbd-server log:" >&2
        tail -n 20 "$tmp/server.log" | sed 's/^/    /' >&2
    fi
    if [[ -n $tmp && -d $tmp ]]; then
        if [[ -n ${DEMO_KEEP-} ]]; then
            echo "demo: kept $tmp"
        else
            rm -rf "$tmp"
        fi
    fi
    if (( rc != 0 )); then
        echo "demo: FAILED (exit status $rc)" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -t 1 ]]; then bold=$'\033[1m' green=$'\033[1;32m' plain=$'\033[0m'; else bold='' green='' plain=''; fi
step_no=0
step() {
    step_no=$((step_no + 1))
    printf '\n%s== %d. %s%s\n' "$bold" "$step_no" "$*" "$plain"
}
# Shows a command, then runs it.
run() {
    local a shown=()
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then shown+=("$a"); else shown+=("'$a'"); fi
    done
    printf '$ %s\n' "${shown[*]}"
    "$@"
}
die() { echo "demo: $*" >&2; exit 1; }
# Fails the demo if the server is no longer running.
check_server() {
    kill -0 "$server_pid" 2>/dev/null && return 0
    local status=0
    wait "$server_pid" || status=$?
    server_pid=
    if (( status > 128 )); then
        die "xnbd-server died of signal $((status - 128)) ($(kill -l $((status - 128))))"
    fi
    die "xnbd-server exited unexpectedly with status $status"
}

step "Install missing Debian packages and build"
scripts/install-deps.sh
make -s
[[ -x $SERVER ]] || die "$SERVER was not built"
for tool in nbdinfo nbdcopy qemu-io qemu-img python3 cmp; do
    command -v "$tool" >/dev/null || die "$tool not found (run scripts/install-deps.sh)"
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/xnbd-demo.XXXXXX")
ref=$tmp/reference.img     # what the default export must contain, kept up to date here
disk=$tmp/disk.img         # the file xnbd-server serves as the default export
orig=$tmp/original.img     # a pristine copy, served as the export "original"
copy=$tmp/copy.img         # copied out over NBD
sock=$tmp/xnbd.sock
log=$tmp/server.log

step "Generate a ${IMAGE_MIB} MiB disk image (deterministic: seed $SEED)"
# Runs of 4 KiB blocks of four kinds: holes (never written, sparse), written
# zeros, random data, and text.  Same seed, same image, byte for byte.
python3 - "$ref" "$IMAGE_MIB" "$BLOCK" "$SEED" <<'PY'
import random, sys
path, mib, block, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
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
print("  blocks: %d x %d bytes = %d MiB" % (total, block, total * block >> 20))
for k, v in counts.items():
    print("  %-7s %6d blocks  %5.1f%%" % (k, v, 100.0 * v / total))
PY
cp --sparse=always "$ref" "$disk"
cp --sparse=always "$ref" "$orig"
echo "  $(du -h --apparent-size "$ref" | cut -f1) apparent, $(du -h "$ref" | cut -f1) allocated"

step "Start xnbd-server on a private unix socket and 127.0.0.1:<ephemeral>"
server_cmd=("$SERVER" --unix "$sock" --listen 127.0.0.1:0
            --port-file "$tmp/port" --pidfile "$tmp/pid"
            --export original="$orig" "$disk")
printf '$ %s &\n' "${server_cmd[*]}"
"${server_cmd[@]}" >"$log" 2>&1 &
server_pid=$!
for _ in $(seq 100); do
    [[ -s $tmp/pid && -s $tmp/port ]] && break
    kill -0 "$server_pid" 2>/dev/null || die "xnbd-server exited during start-up"
    sleep 0.1
done
[[ -s $tmp/pid && -s $tmp/port ]] || die "xnbd-server did not write its pid and port files within 10 s"
port=$(cat "$tmp/port")
[[ $(cat "$tmp/pid") == "$server_pid" ]] || die "pid file says $(cat "$tmp/pid"), started $server_pid"
unix_uri="nbd+unix:///?socket=$sock"
tcp_uri="nbd://127.0.0.1:$port/"
echo "  pid $server_pid, unix socket $sock, TCP port $port"

step "Look at the exports with nbdinfo"
run nbdinfo --list "$tcp_uri"
run nbdinfo "$unix_uri"
check_server

step "Allocation map (base:allocation) of the default export"
run nbdinfo --map --totals "$unix_uri"
printf '$ nbdinfo --map %s | head -12\n' "$unix_uri"
nbdinfo --map "$unix_uri" > "$tmp/map.txt"
head -12 "$tmp/map.txt"
echo "  ... $(wc -l < "$tmp/map.txt") extents in all"
check_server

step "Write through NBD with qemu-io (and the same to the reference copy)"
# Offsets chosen to hit the start, a partial block, the middle and the end.
writes=(
    "0x5a 0 65536"
    "0xa5 1000 5000"
    "0xc3 $((100 * 1024 * 1024)) $((1024 * 1024))"
    "0x3c $((IMAGE_MIB * 1024 * 1024 - 4096)) 4096"
)
for w in "${writes[@]}"; do
    read -r pat off len <<< "$w"
    run qemu-io -f raw -c "write -P $pat $off $len" "$unix_uri"
    python3 - "$ref" "$pat" "$off" "$len" <<'PY'
import sys
path, pat, off, length = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3]), int(sys.argv[4])
with open(path, "r+b") as f:
    f.seek(off); f.write(bytes([pat]) * length)
PY
done
zoff=$((200 * 1024 * 1024)) zlen=$((2 * 1024 * 1024))
run qemu-io -f raw -c "write -z $zoff $zlen" "$unix_uri"
python3 - "$ref" "$zoff" "$zlen" <<'PY'
import sys
path, off, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "r+b") as f:
    f.seek(off); f.write(bytes(length))
PY
run qemu-io -f raw -c "read -P 0xc3 $((100 * 1024 * 1024)) $((1024 * 1024))" -c "read -P 0 $zoff $zlen" "$tcp_uri"
check_server

step "Copy the export out with nbdcopy (multi-conn) and verify"
run nbdcopy "$unix_uri" "$copy"
check_server
run cmp "$ref" "$copy"
echo "  copy is identical to the reference"
run qemu-img compare -f raw -F raw "$ref" "$tcp_uri"
echo "  the named export \"original\" is untouched by the writes above:"
run qemu-img compare -f raw -F raw "$orig" "nbd+unix:///original?socket=$sock"
check_server

step "Stop the server (SIGTERM) and check the file on disk"
run kill -TERM "$server_pid"
status=0
for _ in $(seq 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$server_pid" 2>/dev/null; then
    die "xnbd-server still running 10 s after SIGTERM"
fi
wait "$server_pid" || status=$?
server_pid=
(( status == 0 )) || die "xnbd-server exited with status $status after SIGTERM (expected 0)"
echo "  xnbd-server exited with status 0"
run cmp "$ref" "$disk"
echo "  served file is identical to the reference"

elapsed=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
printf '\n%sPASS%s  xnbd-server served a %d MiB image to nbdinfo, qemu-io, nbdcopy and\n' "$green" "$plain" "$IMAGE_MIB"
printf '      qemu-img over a unix socket and TCP; writes, zeroes, the copy and the\n'
printf '      file on disk all match the reference (%s s).\n' "$elapsed"
