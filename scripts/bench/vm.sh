#!/usr/bin/env bash
# Whole-VM migration benchmark (issue 13): a running VM moves from site A
# to site B over an emulated WAN (scripts/wan-emu/wan-emu, default 20 ms
# RTT, 200 Mbit/s), three ways, side by side in one run:
#
#   qemu-precopy   QEMU's own live migration (pre-copy, default settings:
#                  no multifd, no compression); RAM in the migration stream;
#                  the disk on storage both sites share (it does not cross)
#   qemu-postcopy  the same with the postcopy-ram capability on both sides
#                  and migrate-start-postcopy as soon as the migration
#                  runs: the guest moves to B at once and pulls its pages
#                  from A (QEMU's own post-copy; not in the default runs)
#   xnbd           scripts/vm-migrate: device state by QEMU
#                  (x-ignore-shared), RAM and disk through xnbd-proxy over
#                  xnbd:// (zstd 3), post-copy
#   xnbd-seeds     the same, with a VM already running at B (the same
#                  guest) whose RAM file is the RAM proxy's --seed
#
#   scripts/bench/vm.sh BUILDDIR            (as root; /dev/fuse)
#
# The VM: scripts/vm/guest.sh (TCG unless BENCH_VM_ACCEL=kvm), RAM
# BENCH_VM_RAM MiB (default 512), a 16 MiB disk; "idle" but for the guest's
# own checks (each round rewrites 256 KiB of RAM and 64 KiB of disk), and a
# tick line every 10 ms on its serial console, stamped by the host.
# Figures per run:
#   downtime, QEMU    QEMU's "downtime" (A's query-migrate)
#   downtime, guest   the longest gap between two of the guest's ticks
#                     (host clock; includes B's cold start and, post-copy,
#                     the pages the guest waits for); the usual gap is
#                     given (ticks are 10 ms apart plus the guest's latency)
#   A needed for      from the migration's start until A is no longer
#                     needed: pre-copy, QEMU's total time; xnbd, until the
#                     proxies detached (vm-migrate's figures)
#   WAN bytes         rx+tx of the veth at B during the migration (frames)
#   guest proof       scripts/vm/console-check.py over A's and B's consoles
# and the ratios xnbd / pre-copy measured in this run.
#
# Environment: BENCH_VM_RAM (MiB), BENCH_VM_SETTING (RTT:RATE, default
# 20ms:200mbit), BENCH_VM_ACCEL (tcg), BENCH_TMPDIR (default /dev/shm: the
# VMs' RAM files live there), BENCH_VM_RUNS (default "qemu-precopy xnbd
# xnbd-seeds"; qemu-postcopy on request), BENCH_VM_HOTSET=1 (xnbd runs:
# the proxies log each miss, and the details say how many of the RAM
# misses at B were pages A's QEMU wrote since the migration began --
# scripts/vm/hotset.py, soft-dirty bits: would prefetching those at the
# switch-over cut the guest's stall?  Needs a kernel with
# CONFIG_MEM_SOFT_DIRTY, as Debian's has; without it only the misses are
# logged, in the RAM proxy's log), BENCH_VM_DIRTY=MIB (the guest rewrites
# MIB MiB of its RAM with random bytes without pause: a memory-writing
# workload; default 0, idle), BENCH_VM_KEEP=DIR (xnbd runs: B's logs
# are copied to DIR/RUN).  Saves the table to BUILDDIR/bench-vm.txt.  A benchmark,
# not a test: it fails only when it cannot run.
set -euo pipefail

[[ $# -eq 1 && -d $1 ]] || { echo "usage: $0 BUILDDIR" >&2; exit 2; }
ME=vm.sh
BUILD=$(cd "$1" && pwd)
cd "$(dirname "$0")/../.."
REPO=$PWD
WANEMU=$REPO/scripts/wan-emu/wan-emu
MIGRATE=$REPO/scripts/vm-migrate
QMP=$REPO/scripts/vm/qmp.py
STAMP=$REPO/scripts/vm/console-stamp.py
CHECK=$REPO/scripts/vm/console-check.py
OUT=$BUILD/bench-vm.txt
RAM_MIB=${BENCH_VM_RAM:-512}
SETTING=${BENCH_VM_SETTING:-20ms:200mbit}
RTT=${SETTING%%:*} RATE=${SETTING#*:}
ACCEL=${BENCH_VM_ACCEL:-tcg}
RUNS=${BENCH_VM_RUNS:-qemu-precopy xnbd xnbd-seeds}
HOTSET=${BENCH_VM_HOTSET:-0}
HOTPY=$REPO/scripts/vm/hotset.py
if [[ $HOTSET == 1 ]] && ! "$HOTPY" check; then
    echo "$ME: BENCH_VM_HOTSET: the proxies still log each miss (-v), but the written pages are not measured" >&2
    HOTSET=2
fi
WNAME=xbvm$$
WAN_PORT=10810 MIG_PORT=4444
DIRTY=${BENCH_VM_DIRTY:-0}
[[ $DIRTY =~ ^[0-9]+$ ]] || { echo "vm.sh: BENCH_VM_DIRTY must be a whole number of MiB, not '$DIRTY'" >&2; exit 2; }
APPEND="console=ttyS0 panic=-1 quiet xnbd.tick=10 xnbd.dirty=$DIRTY"

die() { echo "$ME: $*" >&2; exit 1; }
(( EUID == 0 )) || die "run as root (network namespaces)"
[[ $RAM_MIB =~ ^[0-9]+$ ]] && (( RAM_MIB >= 128 )) || die "BENCH_VM_RAM must be MiB, at least 128"
for t in qemu-system-x86_64 nbdfuse fusermount3 busybox python3 ip; do
    command -v "$t" >/dev/null || die "$t not found (run scripts/install-deps.sh)"
done
for p in xnbd-server xnbd-proxy xnbd-ctl wan-relay; do [[ -x $BUILD/$p ]] || die "$BUILD/$p not built"; done
{ exec 9<>/dev/fuse; } 2>/dev/null || die "/dev/fuse cannot be opened (vm-migrate maps B's RAM through nbdfuse)"
exec 9>&-
guest=$(scripts/vm/guest.sh) || die "scripts/vm/guest.sh could not build the guest"
kernel=$(awk '$1 == "kernel" { print $2 }' <<<"$guest")
initrd=$(awk '$1 == "initrd" { print $2 }' <<<"$guest")

tmp=$(mktemp -d "${BENCH_TMPDIR:-/dev/shm}/xnbd-bench-vm.XXXXXX")
pids=() wan_up=0 b_work=''
wan() { "$WANEMU" --name "$WNAME" "$@"; }
stop_pid() {
    local i
    kill -TERM "$1" 2>/dev/null || return 0
    for (( i = 0; i < 100; i++ )); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
stop_all() { local p; for p in "${pids[@]}"; do stop_pid "$p"; done; pids=(); }
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [[ -z $b_work ]] || "$MIGRATE" --stop "$b_work" >/dev/null 2>&1 || true
    stop_all
    (( wan_up )) && { wan down >/dev/null 2>&1 || echo "$ME: 'wan-emu --name $WNAME down' failed" >&2; }
    rm -rf "$tmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# bg SITE LOG CMD...: CMD in namespace SITE (src, dst) or here (host).
bg() {
    local site=$1 log=$2
    shift 2
    if [[ $site == host ]]; then "$@" >"$log" 2>&1 &
    else "$WANEMU" --name "$WNAME" exec "$site" "$@" >"$log" 2>&1 &
    fi
    BG=$!
    pids+=("$BG")
}
last_n() { grep -a -o 'xnbd-vm: n=[0-9]* ' "$1" 2>/dev/null | tail -n 1 | sed 's/.*n=//; s/ //' || true; }
wait_n() {  # FILE MIN SECONDS
    local i n
    for (( i = 0; i < $3 * 10; i++ )); do
        n=$(last_n "$1")
        [[ -n $n ]] && (( n >= $2 )) && return 0
        sleep 0.1
    done
    die "the guest ($1) did not reach n=$2 in $3 s"
}
link_bytes() {
    wan exec dst ip -s -j link show dev wan0 | python3 -c '
import json, sys
s = json.load(sys.stdin)[0]["stats64"]
print(s["rx"]["bytes"] + s["tx"]["bytes"])'
}
vm_args() {
    echo -accel "$ACCEL" -m "${RAM_MIB}M" -smp 1 -nodefaults -display none -no-reboot \
        -machine pc,memory-backend=ram0 -kernel "$kernel" -initrd "$initrd"
}
# boot SITE DIR NAME: a guest with RAM DIR/ram, disk DIR/disk.img, QMP
# DIR/qmp.sock, console stamped to DIR/NAME.console; PID in $VM.
boot() {
    local site=$1 dir=$2 name=$3
    mkdir -p "$dir"
    truncate -s 16M "$dir/disk.img"
    bg host "$dir/$name.stamp.log" "$STAMP" "$dir/$name.sock" "$dir/$name.console" 60
    # shellcheck disable=SC2046
    bg "$site" "$dir/$name.qemu.log" qemu-system-x86_64 $(vm_args) -append "$APPEND" \
        -object "memory-backend-file,id=ram0,size=${RAM_MIB}M,mem-path=$dir/ram,share=on" \
        -drive "file=$dir/disk.img,format=raw,if=virtio" -qmp "unix:$dir/qmp.sock,server=on,wait=off" \
        -chardev "socket,id=con,path=$dir/$name.sock,server=on,wait=on" -serial chardev:con
    VM=$BG
}

echo "$ME: wan-emu $RTT, $RATE; VM ${RAM_MIB} MiB RAM, 16 MiB disk, $ACCEL; runs: $RUNS"
XNBD_BUILD=$BUILD wan up --rtt "$RTT" --rate "$RATE" --forward "$WAN_PORT" --reverse "$MIG_PORT" >"$tmp/wan.log" 2>&1 ||
    { cat "$tmp/wan.log" >&2; die "wan-emu up failed"; }
wan_up=1
a_wan=$(wan relay-addr "$WAN_PORT")
b_mig=$(wan relay-addr --reverse "$MIG_PORT")

results=$tmp/results.jsonl
: > "$results"
for run in $RUNS; do
    echo "$ME: run $run"
    d=$tmp/$run
    mkdir -p "$d"
    seed_vm=''
    if [[ $run == *-seeds ]]; then
        boot dst "$d/seed" seed
        seed_vm=$VM
    fi
    boot src "$d/a" a
    a_vm=$VM
    wait_n "$d/a/a.console" 3 240
    [[ -z $seed_vm ]] || wait_n "$d/seed/seed.console" 1 240
    case $run in
    qemu-precopy|qemu-postcopy)
        mkdir -p "$d/b"
        bg host "$d/b/b.stamp.log" "$STAMP" "$d/b/b.sock" "$d/b/b.console" 60
        # shellcheck disable=SC2046
        bg dst "$d/b/b.qemu.log" qemu-system-x86_64 $(vm_args) -append "$APPEND" \
            -object "memory-backend-file,id=ram0,size=${RAM_MIB}M,mem-path=$d/b/ram,share=on" \
            -drive "file=$d/a/disk.img,format=raw,if=virtio" -qmp "unix:$d/b/qmp.sock,server=on,wait=off" \
            -chardev "socket,id=con,path=$d/b/b.sock,server=on,wait=on" -serial chardev:con \
            -incoming "tcp:0.0.0.0:$MIG_PORT"
        b_vm=$BG
        for (( i = 0; i < 300; i++ )); do [[ -S $d/b/qmp.sock ]] && break; sleep 0.1; done
        if [[ $run == qemu-precopy && $DIRTY != 0 ]]; then
            # A guest that dirties RAM faster than the link carries it never
            # converges: auto-converge throttles its vCPU, as an operator
            # would have QEMU do.
            "$QMP" "$d/a/qmp.sock" migrate-set-capabilities \
                '{"capabilities":[{"capability":"auto-converge","state":true}]}' >/dev/null ||
                die "auto-converge refused"
        fi
        if [[ $run == qemu-postcopy ]]; then
            for q in "$d/a/qmp.sock" "$d/b/qmp.sock"; do
                "$QMP" "$q" migrate-set-capabilities \
                    '{"capabilities":[{"capability":"postcopy-ram","state":true}]}' >/dev/null ||
                    die "postcopy-ram refused by $q"
            done
        fi
        l0=$(link_bytes); t0=$(date +%s%N)
        "$QMP" "$d/a/qmp.sock" migrate "{\"uri\":\"tcp:$b_mig\"}" >/dev/null
        if [[ $run == qemu-postcopy ]]; then
            # Post-copy may start only once the migration is active: one
            # poller process (every 10 ms), not a Python start-up per poll,
            # which took a core here from the migration being timed.
            "$QMP" "$d/a/qmp.sock" --wait-migrate active,completed 2 >/dev/null || true
            "$QMP" "$d/a/qmp.sock" migrate-start-postcopy >/dev/null || die "migrate-start-postcopy failed"
        fi
        m=$("$QMP" "$d/a/qmp.sock" --wait-migrate completed 600) || die "QEMU's migration failed: $m"
        t1=$(date +%s%N); l1=$(link_bytes)
        wait_n "$d/b/b.console" "$(( $(last_n "$d/a/a.console") + 3 ))" 120
        python3 - "$m" "$((l1 - l0))" "$(( (t1 - t0) / 1000000 ))" >"$d/fig.json" <<'PY'
import json, sys
m = json.loads(sys.argv[1])
print(json.dumps({"downtime_ms": m.get("downtime"), "needed_ms": m.get("total-time"),
                  "wan": int(sys.argv[2]), "wall_ms": int(sys.argv[3]),
                  "stream": m["ram"]["transferred"], "note": "RAM %d MiB in the stream, %d dirty-page rounds"
                  % (m["ram"]["transferred"] >> 20, m["ram"].get("dirty-sync-count", 0))}))
PY
        stop_pid "$b_vm"; stop_pid "$a_vm"
        ;;
    xnbd|xnbd-seeds|xnbd-precopy|xnbd-precopy-seeds)
        bg src "$d/a/server.log" "$BUILD/xnbd-server" -r -e "ram=$d/a/ram" -e "disk=$d/a/disk.img" \
            -u "$d/a/srv.sock" -l 127.0.0.1:0 -W "$(wan addr src):$WAN_PORT" --pidfile "$d/a/server.pid"
        server=$BG
        for (( i = 0; i < 300; i++ )); do [[ -s $d/a/server.pid ]] && break; sleep 0.1; done
        mkdir -p "$d/b"
        bg host "$d/b/b.stamp.log" "$STAMP" "$d/b/b.sock" "$d/b/b.console" 300
        seeds=()
        [[ -z $seed_vm ]] || seeds=(--seed "$d/seed/ram")
        b_work=$d/b/vm
        popts=
        if [[ $HOTSET == 1 ]]; then   # see BENCH_VM_HOTSET above
            a_qemu=$(pgrep -f "^qemu-system.*mem-path=$d/a/ram" | head -n 1)
            [[ -n $a_qemu ]] || die "A's QEMU not found"
            "$HOTPY" clear "$a_qemu"
        fi
        [[ $HOTSET == 0 ]] || popts=-v
        pre=()
        [[ $run != xnbd-precopy* ]] || pre=(--precopy)
        l0=$(link_bytes); t0=$(date +%s%N)
        # shellcheck disable=SC2046
        wan exec dst env VM_MIGRATE_PROXY_OPTS="$popts" "$MIGRATE" --xnbd-bin "$BUILD" --a-qmp "$d/a/qmp.sock" --a-ram-uri "xnbd://$a_wan/ram" \
            --a-disk-uri "xnbd://$a_wan/disk" "${seeds[@]}" "${pre[@]}" --migrate-uri "tcp:$b_mig" \
            --incoming "tcp:0.0.0.0:$MIG_PORT" --work "$b_work" --timeout 600 -- \
            qemu-system-x86_64 $(vm_args) -append "$APPEND" \
            -object "memory-backend-file,id=ram0,size=${RAM_MIB}M,mem-path=@RAM@,share=on" \
            -drive "file=@DISK@,format=raw,if=virtio" \
            -chardev "socket,id=con,path=$d/b/b.sock,server=on,wait=on" -serial chardev:con \
            >"$d/migrate.out" 2>&1 || { cat "$d/migrate.out" >&2; die "vm-migrate failed ($run)"; }
        t1=$(date +%s%N); l1=$(link_bytes)
        wait_n "$d/b/b.console" "$(( $(last_n "$d/a/a.console") + 3 ))" 120
        hot=
        if [[ $HOTSET == 1 ]]; then
            "$HOTPY" written "$a_qemu" "$d/a/ram" "$d/written.txt" >/dev/null
            hot=$("$HOTPY" cover "$d/written.txt" "$b_work/ram-proxy.log")
            echo "$ME: $run: pages A's QEMU wrote since the migration began vs B's misses: $hot"
        fi
        python3 - "$d/b/vm/report.json" "$((l1 - l0))" "$(( (t1 - t0) / 1000000 ))" "$d/migrate.out" "$hot" >"$d/fig.json" <<'PY'
import json, re, sys
r = json.load(open(sys.argv[1]))
out = open(sys.argv[4]).read()
hot = json.loads(sys.argv[5]) if sys.argv[5] else None
m = re.search(r"\((\d+) ms in all\)", out)
s = re.search(r"migration stream (\d+) bytes", out)
b = r["ram"]["bytes"]
print(json.dumps({"downtime_ms": r["downtime_ms"], "needed_ms": int(m.group(1)) if m else None,
                  "wan": int(sys.argv[2]), "wall_ms": int(sys.argv[3]),
                  "stream": int(s.group(1)) if s else 0,
                  "note": "RAM fetched %d MiB (%d MiB after zstd), seeds %d MiB, zero %d MiB, "
                          "%d on-demand fetches, %d reads joined background fetches; disk fetched %d MiB"
                  % (b["fetched"] >> 20, r["ram"]["wire"]["rx"] >> 20, b["seeded"] >> 20,
                     b["zero_skipped"] >> 20, r["ram"]["fetches"]["ondemand"],
                     r["ram"]["fetches"].get("joined", 0), r["disk"]["bytes"]["fetched"] >> 20)
                  + ("; of the RAM misses, %d of %d on-demand and %d of %d joined were pages A's QEMU"
                     " wrote since the migration began (%d pages)"
                     % (hot["ondemand_in_written"], hot["ondemand_misses"], hot["joined_in_written"],
                        hot["joined_misses"], hot["written_pages"]) if hot else "")}))
PY
        if [[ -n ${BENCH_VM_KEEP:-} ]]; then   # the logs, for a closer look
            mkdir -p "$BENCH_VM_KEEP/$run" && cp "$b_work"/*.log "$d/migrate.out" "$BENCH_VM_KEEP/$run/" || true
        fi
        "$QMP" "$b_work/qmp.sock" quit >/dev/null 2>&1 || true
        "$MIGRATE" --stop "$b_work" >/dev/null 2>&1 || true
        b_work=''
        stop_pid "$server"; stop_pid "$a_vm"
        ;;
    *) die "unknown run '$run' (BENCH_VM_RUNS: qemu-precopy qemu-postcopy xnbd xnbd-seeds xnbd-precopy xnbd-precopy-seeds)" ;;
    esac
    [[ -z $seed_vm ]] || stop_pid "$seed_vm"
    proof=$("$CHECK" "$d/a/a.console" "$d/b/b.console") || true
    python3 - "$run" "$d/fig.json" "$proof" >>"$results" <<'PY'
import json, sys
f = json.load(open(sys.argv[2])); p = json.loads(sys.argv[3])
f.update(run=sys.argv[1], gap_ms=p.get("max_gap_ms"), gap_at=p.get("max_gap_sites"),
         switch_ms=(p.get("switch_gap_ms") or [None])[0],
         tick_ms=p.get("median_gap_ms"), proof="ok" if p["ok"] else "FAIL " + p["counter_error"] + str(p["fails"]))
print(json.dumps(f))
PY
    rm -rf "$d/a/ram" "$d/b/ram" "$d/seed/ram" "$d/b/vm/ram.img"
    stop_all
done

python3 - "$results" "$RTT" "$RATE" "$RAM_MIB" "$ACCEL" "$DIRTY" <<'PY' | tee "$OUT"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rtt, rate, ram, accel, dirty = sys.argv[2:]
print("Whole-VM migration, wan-emu %s RTT / %s; VM %s MiB RAM + 16 MiB disk, %s, test guest%s"
      % (rtt, rate, ram, accel, ", rewriting %s MiB of RAM without pause" % dirty if dirty != "0" else " (idle)"))
print("(guest figures: gaps between the guest's 10 ms ticks on the host's clock; the usual gap in [])")
print()
print("| method | downtime QEMU | guest: last tick at A -> first at B | guest: longest gap (where) | A needed for | WAN bytes | guest proof | details |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
by = {}
where = {"0": "at A", "1": "at B", "0->1": "A->B"}
for r in rows:
    by[r["run"]] = r
    print("| %s | %s ms | %s ms | %s ms (%s) [%s] | %.1f s | %.1f MiB | %s | %s |"
          % (r["run"], r["downtime_ms"], r["switch_ms"], r["gap_ms"], where.get(r["gap_at"], r["gap_at"]),
             r["tick_ms"], (r["needed_ms"] or 0) / 1000.0, r["wan"] / 1048576, r["proof"], r["note"]))
base = by.get("qemu-precopy")
if base:
    print()
    for k in ("xnbd", "xnbd-seeds", "xnbd-precopy", "xnbd-precopy-seeds"):
        r = by.get(k)
        if not r:
            continue
        def ratio(a, b):
            return "%.2f" % (a / b) if a is not None and b else "n/a"
        print("%s / qemu-precopy: downtime QEMU %s, guest at the move %s, guest longest gap %s, "
              "A needed for %s, WAN bytes %s"
              % (k, ratio(r["downtime_ms"], base["downtime_ms"]), ratio(r["switch_ms"], base["switch_ms"]),
                 ratio(r["gap_ms"], base["gap_ms"]),
                 ratio(r["needed_ms"], base["needed_ms"]), ratio(r["wan"], base["wan"])))
PY
echo "$ME: table saved to $OUT"
