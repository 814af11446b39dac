#!/usr/bin/env bash
# xnbd demo: move a running VM, RAM and disk, from site A to site B across
# an emulated WAN (20 ms RTT, 200 Mbit/s) with scripts/vm-migrate.
#
#   scripts/demo-vm.sh                 installs missing Debian packages, builds, runs
#   DEMO_RAM=512 scripts/demo-vm.sh    the VM's RAM in MiB (default 256)
#   DEMO_ACCEL=tcg|kvm                 force an accelerator (default: KVM when
#                                      /dev/kvm works and the guest boots with it,
#                                      else TCG)
#   DEMO_RTT=50ms DEMO_RATE=100mbit    another emulated WAN
#   DEMO_KEEP=1                        keep the temporary directory
#   DEMO_AFTER=8                       rounds the guest runs at B after the detach
#   DEMO_PRECOPY=1                     vm-migrate --precopy: RAM and disk copied
#                                      to B while the VM still runs at A
#
# What happens:
#   1. Two network namespaces, site A and site B, joined by the WAN emulator
#      (scripts/wan-emu/wan-emu).
#   2. At B a VM is already running (the "seed VM"): its RAM file is the
#      RAM proxy's seed, so pages B already holds do not cross the WAN.
#   3. At A the VM to move runs scripts/vm/guest.sh: it keeps data in RAM
#      and on its disk with checksums it re-verifies continuously, prints
#      a counter, and a tick every 10 ms; the host stamps each console line
#      with its own clock (the guest's clock stops while the VM is stopped).
#   4. A's xnbd-server serves A's RAM file and disk over the WAN transport;
#      vm-migrate runs at B: proxies (--standby, RAM proxy with --seed),
#      nbdfuse, B's QEMU with -incoming; QEMU migrates only the device state
#      (x-ignore-shared); pages and blocks follow on demand and in the
#      background; the proxies detach once all is at B.
#   5. The guest runs on at B; the demo prints the downtime (QEMU's figure
#      and the guest's: the longest gap between its ticks), the time until
#      A is no longer needed, what crossed the WAN, and the guest's proof.
#
# Needs root (network namespaces) and a working /dev/fuse.  Everything it
# started is stopped by PID, the namespaces removed, the temporary
# directory deleted, on every exit path.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
BUILD=${XNBD_BUILD:-$REPO/build}
WANEMU=$REPO/scripts/wan-emu/wan-emu
MIGRATE=$REPO/scripts/vm-migrate
QMP=$REPO/scripts/vm/qmp.py
STAMP=$REPO/scripts/vm/console-stamp.py
CHECK=$REPO/scripts/vm/console-check.py
RTT=${DEMO_RTT:-20ms}
RATE=${DEMO_RATE:-200mbit}
RAM_MIB=${DEMO_RAM:-256}
AFTER=${DEMO_AFTER:-8}
WNAME=xvm$$
WAN_PORT=10810 MIG_PORT=4444

[[ $RAM_MIB =~ ^[0-9]+$ ]] && (( RAM_MIB >= 128 && RAM_MIB <= 4096 )) ||
    { echo "demo-vm: DEMO_RAM must be MiB from 128 to 4096, not '$RAM_MIB'" >&2; exit 2; }
[[ $AFTER =~ ^[0-9]+$ ]] || { echo "demo-vm: DEMO_AFTER must be a number of rounds" >&2; exit 2; }

tmp='' wan_up=0 pids=() b_work=''
if [[ -t 1 ]]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step_no=0
step() { step_no=$((step_no + 1)); printf '\n%s== %d. %s%s\n' "$bold" "$step_no" "$*" "$plain"; }
die() { echo "demo-vm: $*" >&2; exit 1; }
now_ns() { date +%s%N; }
wan() { "$WANEMU" --name "$WNAME" "$@"; }

# Stops PID (one we started): TERM, then KILL after 10 s.
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for (( i = 0; i < 100; i++ )); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
forget() { local p keep=(); for p in "${pids[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done; pids=("${keep[@]}"); }

cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    [[ -z $b_work ]] || "$MIGRATE" --xnbd-bin "$BUILD" --stop "$b_work" >/dev/null 2>&1 || true
    for p in "${pids[@]}"; do stop_pid "$p"; done
    if (( wan_up )); then wan down >/dev/null 2>&1 || echo "demo-vm: 'wan-emu --name $WNAME down' failed; run it by hand" >&2; fi
    if (( rc != 0 )) && [[ -n $tmp ]]; then
        for p in "$tmp"/migrate.out "$tmp"/seed/qemu.log "$tmp"/b/vm/*-proxy.log "$tmp"/b/vm/qemu-b.log "$tmp"/a/qemu.log "$tmp"/a/server.log; do
            [[ -s $p ]] || continue
            echo "demo-vm: last lines of ${p#"$tmp"/}:" >&2
            tail -n 12 "$p" | sed 's/^/    /' >&2
        done
    fi
    if [[ -n $tmp && -d $tmp ]]; then
        if [[ -n ${DEMO_KEEP-} ]]; then echo "demo-vm: kept $tmp"; else rm -rf "$tmp"; fi
    fi
    (( rc == 0 )) || echo "demo-vm: FAILED (exit status $rc)" >&2
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# bg SITE LOG CMD...: starts CMD in namespace SITE (src or dst; "host":
# here) in the background; its PID (wan-emu exec ends in exec) is in $BG.
bg() {
    local site=$1 log=$2
    shift 2
    if [[ $site == host ]]; then "$@" >"$log" 2>&1 &
    else "$WANEMU" --name "$WNAME" exec "$site" "$@" >"$log" 2>&1 &   # a simple command: $! is the program
    fi
    BG=$!
    pids+=("$BG")
}

# The guest's last counter value in a console file.
last_n() { grep -a -o 'xnbd-vm: n=[0-9]* ' "$1" 2>/dev/null | tail -n 1 | sed 's/.*n=//; s/ //' || true; }
# wait_n FILE MIN SECONDS PID: until the guest's counter reaches MIN.
wait_n() {
    local i n
    for (( i = 0; i < $3 * 10; i++ )); do
        n=$(last_n "$1")
        [[ -n $n ]] && (( n >= $2 )) && return 0
        ! grep -a -q 'xnbd-vm: FAIL' "$1" 2>/dev/null || die "the guest reported a failure: $(grep -a 'xnbd-vm: FAIL' "$1" | head -n 3)"
        kill -0 "$4" 2>/dev/null || die "the VM exited (console: $1)"
        sleep 0.1
    done
    return 1
}
# Bytes through wan0 at B, both directions: everything that crossed the WAN.
link_bytes() {
    wan exec dst ip -s -j link show dev wan0 | python3 -c '
import json, sys
s = json.load(sys.stdin)[0]["stats64"]
print(s["rx"]["bytes"] + s["tx"]["bytes"])'
}
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

# ---------------------------------------------------------------- 1
step "Dependencies, build"
scripts/install-deps.sh
make -s
for p in xnbd-server xnbd-proxy xnbd-ctl wan-relay; do [[ -x $BUILD/$p ]] || die "$BUILD/$p was not built"; done
for t in qemu-system-x86_64 nbdfuse fusermount3 busybox python3 ip; do
    command -v "$t" >/dev/null || die "$t not found (run scripts/install-deps.sh)"
done
(( EUID == 0 )) || die "run as root: the two sites are network namespaces"
{ exec 9<>/dev/fuse; } 2>/dev/null || die "/dev/fuse cannot be opened: B maps the VM's RAM through nbdfuse (load the fuse module)"
exec 9>&-
guest=$(scripts/vm/guest.sh) || die "scripts/vm/guest.sh could not build the guest"
kernel=$(awk '$1 == "kernel" { print $2 }' <<<"$guest")
initrd=$(awk '$1 == "initrd" { print $2 }' <<<"$guest")
tmp=$(mktemp -d "${TMPDIR:-/tmp}/xnbd-demo-vm.XXXXXX")
a=$tmp/a b=$tmp/b s=$tmp/seed
mkdir -p "$a" "$b" "$s"
echo "  T=$tmp  (the demo's files)"

# ---------------------------------------------------------------- 2
step "Two sites joined by an emulated WAN: $RTT round trip, $RATE"
XNBD_BUILD=$BUILD wan up --rtt "$RTT" --rate "$RATE" --forward "$WAN_PORT" --reverse "$MIG_PORT" 2>&1 | sed 's/^/  /'
wan_up=1
a_wan=$(wan relay-addr "$WAN_PORT")               # A's xnbd-server, as B reaches it
b_mig=$(wan relay-addr --reverse "$MIG_PORT")     # B's QEMU, as A reaches it

# ---------------------------------------------------------------- 3
step "Site B: a VM already running there (its RAM will be the seed)"
APPEND="console=ttyS0 panic=-1 quiet"
vm_args() {  # ACCEL: the machine of the three VMs (memory backend, disk, console added per VM)
    echo -accel "$1" -m "${RAM_MIB}M" -smp 1 -nodefaults -display none -no-reboot \
        -machine pc,memory-backend=ram0 -kernel "$kernel" -initrd "$initrd"
}
# start_vm SITE DIR ACCEL APPEND CONSOLE-ARGS...: a guest with RAM in
# DIR/ram and disk DIR/disk.img, QMP at DIR/qmp.sock; PID in $VM.
start_vm() {
    local site=$1 dir=$2 accel=$3 append=$4
    shift 4
    truncate -s 16M "$dir/disk.img"
    # shellcheck disable=SC2046  # vm_args is a word list
    bg "$site" "$dir/qemu.log" qemu-system-x86_64 $(vm_args "$accel") -append "$append" \
        -object "memory-backend-file,id=ram0,size=${RAM_MIB}M,mem-path=$dir/ram,share=on" \
        -drive "file=$dir/disk.img,format=raw,if=virtio" -qmp "unix:$dir/qmp.sock,server=on,wait=off" "$@"
    VM=$BG
}
accel=${DEMO_ACCEL:-}
if [[ -z $accel ]]; then
    accel=tcg
    if { exec 9<>/dev/kvm; } 2>/dev/null; then exec 9>&-; accel=kvm; fi
fi
[[ $accel == kvm || $accel == tcg ]] || die "DEMO_ACCEL must be kvm or tcg"
# The seed VM runs the same guest (same kernel, same shared static data):
# B holds many of the moving VM's pages already.
start_vm dst "$s" "$accel" "$APPEND" -serial "file:$s/console"
seed_vm=$VM
# A KVM guest that boots prints its first line in a few seconds; where
# KVM is there but broken (seen under some nested hypervisors) it prints
# nothing: then TCG.
kvm_boots() {
    local i
    for (( i = 0; i < 200; i++ )); do
        grep -a -q 'xnbd-vm: ' "$s/console" 2>/dev/null && return 0
        kill -0 "$seed_vm" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
if [[ $accel == kvm ]] && ! kvm_boots; then
    echo "  KVM: the guest printed nothing in 20 s here; using TCG instead"
    stop_pid "$seed_vm"; forget "$seed_vm"
    accel=tcg
    rm -f "$s/console" "$s/ram"
    start_vm dst "$s" "$accel" "$APPEND" -serial "file:$s/console"
    seed_vm=$VM
fi
echo "  accelerator: $accel; RAM ${RAM_MIB} MiB; the seed VM's RAM: \$T/seed/ram"

# ---------------------------------------------------------------- 4
step "Site A: the VM to move (a guest that checks its own RAM and disk)"
start_vm src "$a" "$accel" "$APPEND xnbd.tick=10" \
    -chardev "socket,id=con,path=$a/con.sock,server=on,wait=on" -serial chardev:con
a_vm=$VM
bg host "$a/stamp.log" "$STAMP" "$a/con.sock" "$a/console" 30
wait_n "$a/console" 3 180 "$a_vm" || die "the VM at A did not start counting in 180 s"
wait_n "$s/console" 1 180 "$seed_vm" || die "the seed VM at B did not start in 180 s"
echo "  A's guest is counting: n=$(last_n "$a/console"); the seed VM at B: n=$(last_n "$s/console")"
bg src "$a/server.log" "$BUILD/xnbd-server" -r -e "ram=$a/ram" -e "disk=$a/disk.img" -u "$a/srv.sock" \
    -l 127.0.0.1:0 -W "$(wan addr src):$WAN_PORT" --pidfile "$a/server.pid"
server=$BG
for (( i = 0; i < 300; i++ )); do [[ -s $a/server.pid ]] && break; kill -0 "$server" || die "xnbd-server exited"; sleep 0.1; done
[[ -s $a/server.pid ]] || die "xnbd-server did not start in 30 s"
echo "  siteA\$ xnbd-server -r -e ram=\$T/a/ram -e disk=\$T/a/disk.img -W $(wan addr src):$WAN_PORT"

# ---------------------------------------------------------------- 5
step "Migrate: vm-migrate at B"
b_work=$b/vm
bg host "$b/stamp.log" "$STAMP" "$b/con.sock" "$b/console" 300
precopy=()
[[ ${DEMO_PRECOPY:-0} != 1 ]] || precopy=(--precopy)
mig=("$MIGRATE" --xnbd-bin "$BUILD" --a-qmp "$a/qmp.sock" --a-ram-uri "xnbd://$a_wan/ram"
     --a-disk-uri "xnbd://$a_wan/disk" --seed "$s/ram" --migrate-uri "tcp:$b_mig"
     --incoming "tcp:0.0.0.0:$MIG_PORT" --work "$b_work" --timeout 300 --quit-a
     "${precopy[@]}" --
     qemu-system-x86_64 $(vm_args "$accel") -append "$APPEND xnbd.tick=10"
     -object "memory-backend-file,id=ram0,size=${RAM_MIB}M,mem-path=@RAM@,share=on"
     -drive "file=@DISK@,format=raw,if=virtio"
     -chardev "socket,id=con,path=$b/con.sock,server=on,wait=on" -serial chardev:con)
printf '  siteB$ vm-migrate --a-qmp \$T/a/qmp.sock --a-ram-uri xnbd://%s/ram --a-disk-uri xnbd://%s/disk \\\n' "$a_wan" "$a_wan"
printf '           --seed \$T/seed/ram --migrate-uri tcp:%s --incoming tcp:0.0.0.0:%s --work \$T/b/vm --quit-a%s \\\n' "$b_mig" "$MIG_PORT" "${precopy[*]:+ ${precopy[*]}}"
printf '           -- qemu-system-x86_64 ... mem-path=@RAM@,share=on ... file=@DISK@ ...\n'
n_before=$(last_n "$a/console")
l0=$(link_bytes)
t0=$(now_ns)
wan exec dst "${mig[@]}" > "$tmp/migrate.out" 2>&1 || die "vm-migrate failed"
t1=$(now_ns)
l1=$(link_bytes)
sed 's/^/  /' "$tmp/migrate.out"
forget "$a_vm"         # --quit-a: A's QEMU is gone
wait "$a_vm" 2>/dev/null || true

# ---------------------------------------------------------------- 6
step "The VM runs on at B ($AFTER more rounds; A is switched off)"
stop_pid "$server"; forget "$server"
n_detach=$(last_n "$b/console")
[[ -n $n_detach ]] || n_detach=$(last_n "$a/console")
b_pid=$(cat "$b_work/qemu.pid")
wait_n "$b/console" "$(( n_detach + AFTER ))" 180 "$b_pid" || die "the guest at B did not count $AFTER more rounds in 180 s"
"$QMP" "$b_work/qmp.sock" quit >/dev/null 2>&1 || true
for (( i = 0; i < 100; i++ )); do kill -0 "$b_pid" 2>/dev/null || break; sleep 0.1; done
"$MIGRATE" --xnbd-bin "$BUILD" --stop "$b_work" >/dev/null 2>&1 || true
b_work=''

# ---------------------------------------------------------------- 7
step "Results"
proof=$("$CHECK" "$a/console" "$b/console") || true
python3 - "$proof" "$b/vm/report.json" "$tmp/migrate.out" "$((l1 - l0))" "$(( (t1 - t0) / 1000000 ))" \
    "$n_before" "$RTT" "$RATE" "$accel" "$RAM_MIB" <<'PY'
import json, re, sys
proof, rep = json.loads(sys.argv[1]), json.load(open(sys.argv[2]))
out = open(sys.argv[3]).read()
link, total_ms, n_before, rtt, rate, accel, ram_mib = sys.argv[4:]
def mib(n): return "%.1f MiB" % (int(n) / 1048576)
r, d = rep["ram"], rep["disk"]
m = re.search(r"migration stream (\d+) bytes", out)
stream = int(m.group(1)) if m else 0
print("  VM: %s MiB RAM, 16 MiB disk, %s; WAN %s RTT, %s" % (ram_mib, accel, rtt, rate))
print("  downtime, QEMU's figure        %s ms" % rep["downtime_ms"])
print("  downtime, as the guest saw it  %s ms (longest gap between its 10 ms ticks, host clock;"
      % proof.get("max_gap_ms", "?"))
print("                                 %s; the ticks' usual gap: %s ms)"
      % ("at the move" if proof.get("max_gap_sites") == "0->1" else "not at the move: site %s" % proof.get("max_gap_sites"),
         proof.get("median_gap_ms", "?")))
print("  A stopped -> B running         %s ms (seen by vm-migrate)" % rep["switch_ms"])
print("  switch-over -> detach          %s ms: A is no longer needed (vm-migrate in all: %s ms)"
      % (rep["detach_ms"], total_ms))
print("  bytes on the WAN (wan0 at B)   %s in all, both directions" % mib(link))
print("    migration stream (QEMU)      %s (device state only: x-ignore-shared)" % mib(stream))
pre = rep.get("precopy_fetched", 0)
if pre:
    print("    pre-copy (--precopy)         %s of RAM and disk (%s on the wire, zstd), while the VM ran at A"
          % (mib(pre), mib(rep.get("precopy_wire_rx", 0))))
for name, j in (("RAM", r), ("disk", d)):
    b, w = j["bytes"], j["wire"]
    print("    %-4s %9s: fetched %s (%s on the wire, zstd), from seeds at B %s%s, zero %s, digests %s"
          % (name, mib(j["image_size"]), mib(b["fetched"]), mib(w["rx"]), mib(b["seeded"]),
             " (with the pre-copy's blocks that still matched)" if pre else "",
             mib(b["zero_skipped"]), mib(b["digests"])))
print("  the guest's proof: %s" % ("OK" if proof["ok"] else "FAILED"))
print("    counter n=%s..%s, one by one across the move (%s rounds at A, %s at B)"
      % (proof["n_first"], proof["n_last"], proof["rounds"][0], proof["rounds"][1]))
print("    ticks: %s at A, %s at B, none lost; checksum failures: %s"
      % (proof["ticks"][0], proof["ticks"][1], len(proof["fails"])))
print("    n=%s when the migration started; every RAM chunk, static piece and disk block"
      % n_before)
print("    re-verified at B (8+ rounds after the detach)")
if not proof["ok"]:
    print("  FAILED: %s %s" % (proof["counter_error"], proof["fails"]))
    sys.exit(1)
PY
