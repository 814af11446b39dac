#!/usr/bin/env bash
# Deduplication benchmark (issue 10, DESIGN.md section 5) on realistic data:
# Debian 12 disk images built by scripts/bench/data/debian-images.sh (cached
# in BENCH_CACHE; see there), over an emulated WAN (scripts/wan-emu/wan-emu,
# default 20 ms / 200 Mbit/s).
#
#   scripts/bench/dedup.sh BUILDDIR            (as root)
#
# Runs, each a migration of "new" (xnbd-server in the "src" namespace, read
# only) to xnbd-proxy --cache-all in "dst" over xnbd:// (zstd 3):
#   no-seeds        no seeds: every non-zero block crosses
#   seed-old        --seed old.img --index (built beforehand, see below)
#   inplace-seed    (when new-inplace.img exists) new-inplace migrated with
#                   --seed old.img: the same-offset case
#   inplace-warm    the same from a server whose digest sidecar is filled
#                   (a copy of the image in the scratch directory, its
#                   digests read once before): a source that served them
#                   before, where the others hash them at the first read
#   nbdcopy         nbdcopy of new from `nbdkit file` in src to a file in dst
#   ram-no-seeds,   (when scripts/bench/data/vm-ram.sh can make them) the RAM
#   ram-seed        of a small VM's second run, without seeds and with
#                   --seed the RAM of its first run
# Bytes over the link: rx+tx of the dst veth (its segments, headers included).  The
# limit of a run is (bytes that must cross) / rate + 2 x RTT, where the
# bytes that must cross are: `zstd -3` of the non-zero 4 KiB blocks that
# are in no seed (all non-zero blocks without seeds), plus 32 bytes of
# digest per non-zero block when seeds are used (zero blocks are resolved
# by block status); for nbdcopy the non-zero bytes as they are.  The
# blocks present in the seeds are computed here (Python, hashlib, 4 KiB
# blocks), with the share found at any offset and at the same offset.
# time/phys compares the same bytes with what the link really carries: at
# the start of each pass one plain TCP stream (100 MB, wan-lib.sh
# link_ceiling) crosses it; its payload rate after start-up replaces the
# nominal rate (on this machine's relay: ~0.91 of it, headers included).
#
# Also: the latency of single 4 KiB reads of blocks that are in the seed,
# ahead of a slow background copy (--bg-rate, then paused) once all
# digests are in, i.e. misses served from the seed; next to the same reads
# through a proxy without seeds (misses served by the source); indexing
# throughput (build/tests/index-speed over old.img) against `openssl speed
# -multi NCPU -evp sha256 -bytes 4096`, and the index's RAM per block.
#
# Environment:
#   BENCH_DEDUP_SETTING  RTT:RATE (default 20ms:200mbit)
#   BENCH_PEER_CAP       seconds after which a copy is stopped (default 600)
#   BENCH_LAT_N          reads per latency measurement (default 100)
#   BENCH_DEDUP_RUNS     passes over the xnbd migrations (default 3), one
#                        after the other (a pass runs each once): the table
#                        gives each row's median time and the range; the
#                        other columns are those of the median run.  One
#                        run on a shared 2-core VM varied by up to 10 %.
#   BENCH_CACHE          where the data images are kept (see data/cache.sh)
#   BENCH_TMPDIR         scratch directory (default /dev/shm when it has 6
#                        GiB free, else $TMPDIR or /tmp): the destination's
#                        caches go there.  On this machine's VM disk, the
#                        fsyncs of a seeded copy's 358 MB of cache writes
#                        added 0-0.25 s, growing over back-to-back runs; the
#                        WAN and the engine are what is measured here.
#
# Saves the table to BUILDDIR/bench-dedup.txt, run details to
# BUILDDIR/dedup-trace.txt.  A benchmark, not a test: it fails only when it
# cannot run.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ -z ${BENCH_TMPDIR:-} ]] && [[ -d /dev/shm ]] &&
   (( $(df -Pk /dev/shm | awk 'NR == 2 { print $4 }') > 6 * 1024 * 1024 )); then
    export BENCH_TMPDIR=/dev/shm
fi
# shellcheck source=proxy.sh
. "$BENCH_DIR/proxy.sh"
bench_init dedup.sh "$@"
LAT=$BUILDDIR/tests/lat
IXSPEED=$BUILDDIR/tests/index-speed
WAN=$PWD/scripts/wan-emu/wan-emu
OUT=$BUILDDIR/bench-dedup.txt
TRACE=$BUILDDIR/dedup-trace.txt
SETTING=${BENCH_DEDUP_SETTING:-20ms:200mbit}
CAP=${BENCH_PEER_CAP:-600}
LAT_N=${BENCH_LAT_N:-100}
RUNS=${BENCH_DEDUP_RUNS:-3}
[[ $RUNS =~ ^[1-9][0-9]?$ ]] || die "BENCH_DEDUP_RUNS must be a number from 1 to 99, not '$RUNS'"
ZSTD_LEVEL=3

for v in CAP LAT_N; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done
[[ $SETTING =~ ^[0-9.]+(ms|us|s)?:[0-9.]+[kmg]?bit$ ]] ||
    die "bad BENCH_DEDUP_SETTING '$SETTING' (use RTT:RATE, e.g. 20ms:200mbit)"
(( EUID == 0 )) || die "must run as root (network namespaces and tc, debootstrap)"
for f in "$XNBD" "$PROXY" "$BUILDDIR/wan-relay" "$LAT" "$IXSPEED"; do
    [[ -x $f ]] || die "$f not found; run 'make' first"
done
for tool in nbdcopy nbdkit zstd ip python3 openssl; do
    command -v "$tool" >/dev/null || die "$tool not found; run scripts/install-deps.sh"
done

export XNBD_BUILD=$BUILDDIR
WNAME=xdedup$$
wan_up=0
PIDS=()
# shellcheck source=wan-lib.sh
. "$BENCH_DIR/wan-lib.sh"
bench_tmpdir dedup
chmod 755 "$tmp"
: > "$TRACE"
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- Data
echo "dedup: data images (built once, then cached)"
"$BENCH_DIR/data/debian-images.sh" > "$tmp/images" || die "could not build the data images (see above)"
OLD=$(awk '$1 == "old" { print $2 }' "$tmp/images")
NEW=$(awk '$1 == "new" { print $2 }' "$tmp/images")
INPLACE=$(awk '$1 == "new-inplace" { print $2 }' "$tmp/images")
[[ -f $OLD && -f $NEW ]] || die "the data scripts made no old/new image: $(cat "$tmp/images")"
DATA_LABEL="Debian 12 debootstrap images"
[[ $OLD == */offline/* ]] && DATA_LABEL="OFFLINE fallback images (ext4 of this machine's /usr, and /usr + /opt; no Debian mirror reachable)"

# analyse IMG SEED... : prints one JSON line: blocks, non-zero blocks,
# those found in the seeds at any offset / at the same offset (in the
# first seed), zstd -3 of all non-zero blocks and of those in no seed,
# and the non-zero blocks of the (first) seed; writes the numbers of IMG's
# blocks found in a seed to $tmp/seeded.blocks, one a line.
analyse() {
    python3 - "$ZSTD_LEVEL" "$tmp/seeded.blocks" "$@" <<'PY'
import hashlib, json, subprocess, sys, threading
level, blkfile, img, seeds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
BS = 4096
Z = bytes(BS)
def blocks(path):
    with open(path, "rb", buffering=0) as f:
        i = 0
        while True:
            b = f.read(1 << 22)
            if not b:
                return
            for o in range(0, len(b), BS):
                x = b[o:o + BS]
                yield i, x.ljust(BS, b"\0")
                i += 1
have = set()
first = {}
for k, s in enumerate(seeds):
    for i, x in blocks(s):
        if x != Z:
            d = hashlib.sha256(x).digest()
            have.add(d)
            if k == 0:
                first[i] = d
seed_nz = len(first)
def zsize():
    p = subprocess.Popen(["zstd", "-q", "-%s" % level, "-c"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
    out = []
    t = threading.Thread(target=lambda: out.append(len(p.stdout.read())))
    t.start()
    return p, t, out
pa, ta, oa = zsize()
pu, tu, ou = zsize()
total = nz = anyoff = same = 0
seeded = []
for i, x in blocks(img):
    total += 1
    if x == Z:
        continue
    nz += 1
    d = hashlib.sha256(x).digest()
    pa.stdin.write(x)
    if d in have:
        anyoff += 1
        seeded.append(i)
    else:
        pu.stdin.write(x)
    if first.get(i) == d:
        same += 1
for p, t in ((pa, ta), (pu, tu)):
    p.stdin.close(); p.wait(); t.join()
with open(blkfile, "w") as f:
    f.write("".join("%d\n" % b for b in seeded))
print(json.dumps({"blocks": total, "nonzero": nz, "any": anyoff, "same": same,
                  "zstd_all": oa[0], "zstd_unseeded": ou[0], "seed_nonzero": seed_nz}))
PY
}
jget() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

echo "dedup: analysing new against old (SHA-256 of 4 KiB blocks, zstd -$ZSTD_LEVEL)"
A_NEW=$(analyse "$NEW" "$OLD")
cp "$tmp/seeded.blocks" "$tmp/seeded-new.blocks"
echo "  $A_NEW"
# RAM images of two runs of a small VM (QEMU, TCG): optional, skipped when
# they cannot be made (no qemu-system-x86_64, no network for the kernel).
VM1= VM2= A_RAM=
if "$BENCH_DIR/data/vm-ram.sh" > "$tmp/vm-images"; then
    VM1=$(awk '$1 == "vm1" { print $2 }' "$tmp/vm-images")
    VM2=$(awk '$1 == "vm2" { print $2 }' "$tmp/vm-images")
else
    echo "$ME: no VM RAM images (see above): the RAM rows are left out" >&2
fi
A_INP=
if [[ -n $INPLACE ]]; then
    echo "dedup: analysing new-inplace against old"
    A_INP=$(analyse "$INPLACE" "$OLD")
    echo "  $A_INP"
fi

if [[ -n $VM2 ]]; then
    echo "dedup: analysing vm2.ram against vm1.ram"
    A_RAM=$(analyse "$VM2" "$VM1")
    echo "  $A_RAM"
fi

# ---------------------------------------------------------------- Indexing
# Throughput over every image (more data, a steadier figure); the index
# the migrations use holds old.img only.  The images were just read by the
# analysis: hashing, not the disk, is measured.
ALL_IMGS=("$OLD" "$NEW")
[[ -n $INPLACE ]] && ALL_IMGS+=("$INPLACE")
ALLOC=0
for f in "${ALL_IMGS[@]}"; do ALLOC=$(( ALLOC + $(stat -c '%b * %B' "$f") )); done
echo "dedup: indexing ${#ALL_IMGS[@]} images ($ALLOC bytes allocated) with index-speed," \
     "and openssl speed -multi $(nproc) -evp sha256 -bytes 4096"
# Best of three for both (the machine is shared: a short run can lose the
# CPU to another job).
IX_OUT= best=
for r in 1 2 3; do
    o=$(nice "$IXSPEED" "$tmp/all.index" "${ALL_IMGS[@]}" 2>&1) || die "index-speed failed: $o"
    echo "$o" | sed 's/^/  /'
    hs=$(sed -n 's/^build: .* hashed in \([0-9.]*\) s .*/\1/p' <<< "$o")
    if [[ -z $best ]] || awk -v a="$hs" -v b="$best" 'BEGIN { exit !(a < b) }'; then
        best=$hs IX_OUT=$o
    fi
done
IDX=$tmp/seeds.index
IX_OLD=$("$IXSPEED" "$IDX" "$OLD" 2>&1) || die "index-speed (old.img) failed: $IX_OLD"
if [[ -n $VM1 ]]; then
    IX_VM=$("$IXSPEED" "$tmp/vm.index" "$VM1" 2>&1) || die "index-speed (vm1.ram) failed: $IX_VM"
fi
SSL_OUT= sbest=0
for r in 1 2 3; do
    o=$(nice openssl speed -multi "$(nproc)" -seconds 2 -evp sha256 -bytes 4096 2>/dev/null | tail -1)
    echo "  openssl: $o"
    v=$(awk '{ sub(/k$/, "", $NF); print $NF + 0 }' <<< "$o")
    if awk -v a="$v" -v b="$sbest" 'BEGIN { exit !(a > b) }'; then sbest=$v SSL_OUT=$o; fi
done

# ---------------------------------------------------------------- WAN
rtt=${SETTING%%:*} rate=${SETTING#*:}
SETTING_LABEL="rtt $rtt rate $rate"
read -r rtt_s rate_bps < <(setting_numbers "$rtt" "$rate")
NONZERO=$(( $(jget "$A_NEW" nonzero) * 4096 ))     # for run_lat
echo "dedup: wan-emu up --rtt $rtt --rate $rate"
wan_start "$rtt" "$rate" 10810,10811,10812,10813,10814,10815

# Sources in src: xnbd-server of new (WAN transport), nbdkit file of new,
# xnbd-server of new-inplace.  --image-id=stat: nothing written beside the
# cached images.
start_bg spid "$WAN" --name "$WNAME" exec src "$XNBD" -r --image-id=stat -W 10.254.0.1:10810 \
    -l 127.0.0.1:0 -p "$tmp/src-new.pid" "$NEW" 2>"$tmp/src-new.log"
start_bg kpid "$WAN" --name "$WNAME" exec src nbdkit -f -r -i 10.254.0.1 -p 10811 \
    --pidfile "$tmp/src-nbdkit.pid" file "$NEW" 2>"$tmp/src-nbdkit.log"
wait_file_ready "$tmp/src-new.pid" "$spid" 10 || die "xnbd-server in src did not start: $(cat "$tmp/src-new.log")"
wait_file_ready "$tmp/src-nbdkit.pid" "$kpid" 10 || die "nbdkit in src did not start: $(cat "$tmp/src-nbdkit.log")"
if [[ -n $INPLACE ]]; then
    start_bg ipid "$WAN" --name "$WNAME" exec src "$XNBD" -r --image-id=stat -W 10.254.0.1:10812 \
        -l 127.0.0.1:0 -p "$tmp/src-inp.pid" "$INPLACE" 2>"$tmp/src-inp.log"
    wait_file_ready "$tmp/src-inp.pid" "$ipid" 10 || die "xnbd-server (new-inplace) did not start: $(cat "$tmp/src-inp.log")"
    # The warm source: a copy with an identity and a sidecar, filled by one
    # read of its digest export (on its local port).
    cp --sparse=always "$INPLACE" "$tmp/inplace-warm-src.img"
    start_bg wpid_src "$WAN" --name "$WNAME" exec src "$XNBD" -r -W 10.254.0.1:10814 \
        -l 127.0.0.1:0 --port-file "$tmp/src-warm.port" -p "$tmp/src-warm.pid" \
        "$tmp/inplace-warm-src.img" 2>"$tmp/src-warm.log"
    wait_file_ready "$tmp/src-warm.pid" "$wpid_src" 10 || die "xnbd-server (warm new-inplace) did not start: $(cat "$tmp/src-warm.log")"
    "$WAN" --name "$WNAME" exec src nbdcopy "nbd://127.0.0.1:$(cat "$tmp/src-warm.port")/@xnbd-sha256" null: ||
        die "reading the warm source's digests failed: $(tail -3 "$tmp/src-warm.log")"
fi
if [[ -n $VM2 ]]; then
    start_bg vpid "$WAN" --name "$WNAME" exec src "$XNBD" -r --image-id=stat -W 10.254.0.1:10813 \
        -l 127.0.0.1:0 -p "$tmp/src-vm.pid" "$VM2" 2>"$tmp/src-vm.log"
    wait_file_ready "$tmp/src-vm.pid" "$vpid" 10 || die "xnbd-server (vm2.ram) did not start: $(cat "$tmp/src-vm.log")"
fi
a_new=$(wan relay-addr 10810) a_kit=$(wan relay-addr 10811)
a_inp=
[[ -n $INPLACE ]] && a_inp=$(wan relay-addr 10812)

results=$tmp/results.tsv
: > "$results"
record() { local IFS=$'\t'; echo "$*" >> "$results"; }

# one_xnbd NAME IMAGE URI [PROXY OPTIONS...]: a timed copy, verified.
one_xnbd() {
    local name=$1 image=$2 uri=$3 verify="not checked" st
    shift 3
    img=$image
    echo "  $name: xnbd-proxy --cache-all $* ($uri)"
    run_xnbd "$name" "$uri" "$@"
    if [[ $R_TIME =~ ^[0-9.]+$ ]]; then
        cmp -s "$image" "$tmp/$name.img" && verify="identical to the image" || verify="DIFFERS from the image"
    fi
    st=$tmp/$name.status
    record "$name" "$R_TIME" "$R_LINK" "$(status_get "$st" bytes.fetched)" \
        "$(status_get "$st" bytes.seeded)" "$(status_get "$st" bytes.zero_skipped)" \
        "$(status_get "$st" bytes.digests)" "$(status_get "$st" wire.rx)" \
        "$(status_get "$st" wire.rx_raw)" "cache $verify$(grep -m1 'deduplication:' "$tmp/$name.log" | sed 's/^.*deduplication/; deduplication/' || true); stolen $R_STEAL ms"
    echo "    $R_TIME s, link $R_LINK B, cache $verify, CPU stolen $R_STEAL ms"
    rm -f "$tmp/$name.img" "$tmp/$name.bm"
}

[[ -n $VM2 ]] && a_vm=$(wan relay-addr 10813)
for (( pass = 1; pass <= RUNS; pass++ )); do
    echo "  pass $pass of $RUNS"
    if link_ceiling 10815 100; then
        record ceiling "$C_PAYLOAD" "$C_FRAMES" "$C_RATIO"
        echo "  link ceiling: one TCP stream carries $C_PAYLOAD B/s of payload, $C_FRAMES B/s at the veth"
    else
        echo "  link ceiling: the plain TCP stream failed (no physical column)" >&2
    fi
    one_xnbd no-seeds "$NEW" "xnbd://$a_new/"
    one_xnbd seed-old "$NEW" "xnbd://$a_new/" --seed "$OLD" --index "$IDX"
    [[ -n $INPLACE ]] && one_xnbd inplace-seed "$INPLACE" "xnbd://$a_inp/" --seed "$OLD" --index "$IDX"
    [[ -n $INPLACE ]] && one_xnbd inplace-warm "$INPLACE" "xnbd://$(wan relay-addr 10814)/" --seed "$OLD" --index "$IDX"
    if [[ -n $VM2 ]]; then
        one_xnbd ram-no-seeds "$VM2" "xnbd://$a_vm/"
        one_xnbd ram-seed "$VM2" "xnbd://$a_vm/" --seed "$VM1" --index "$tmp/vm.index"
    fi
done
echo "  nbdcopy: nbd://$a_kit/ (nbdkit file of new) to a file"
img=$NEW
run_nbdcopy "$a_kit"
record nbdcopy "$R_TIME" "$R_LINK" - - - - - - "$R_NOTE"
echo "    $R_TIME s, link $R_LINK B"

# ---------------------------------------------------------------- Latency
# delta A B: B - A, or "-" when either is not a number.
delta() { [[ $1 =~ ^[0-9]+$ && $2 =~ ^[0-9]+$ ]] && echo $(( $2 - $1 )) || echo -; }

# pick_offsets HI: writes $tmp/lat.off, LAT_N offsets of blocks of new
# that are in the seed, spread over blocks [HI/2, HI), shuffled.
pick_offsets() {
    python3 - "$tmp/seeded-new.blocks" "$1" "$LAT_N" "$tmp/lat.off" <<'PY'
import random, sys
blocks = [int(l) for l in open(sys.argv[1])]
hi, n = int(sys.argv[2]), int(sys.argv[3])
cand = [b for b in blocks if hi // 2 <= b < hi] or blocks
rng = random.Random("dedup-lat")
sel = []
for k in range(n):
    s = cand[len(cand) * k // n:len(cand) * (k + 1) // n] or cand
    sel.append(rng.choice(s))
rng.shuffle(sel)
open(sys.argv[4], "w").write("".join("%d\n" % (b * 4096) for b in sel))
PY
}

# Misses served from the seed: a slow background copy, all digests in,
# then paused; reads of seeded blocks in the last half of the image.
echo "  latency: misses served from the seed (digests in, copy paused)"
name=lat-seed
nblocks=$(jget "$A_NEW" blocks)
pick_offsets "$nblocks"             # replaced once the digests are in
rm -f "$tmp/$name".{img,bm,ctl,sock,pid}
start_bg lpid "$WAN" --name "$WNAME" exec dst "$PROXY" --target "xnbd://$a_new/" --cache "$tmp/$name.img" \
    --bitmap "$tmp/$name.bm" --control "$tmp/$name.ctl" -u "$tmp/$name.sock" -p "$tmp/$name.pid" \
    --cache-all --bg-rate 1mbit --seed "$OLD" --index "$IDX" 2>"$tmp/$name.log"
LS_RESULT=FAIL LS_NOTE=
if wait_file_ready "$tmp/$name.pid" "$lpid" 60; then
    # The proxy reads digests a window ahead of the copy (not the whole
    # image at once): wait until all are in, or until the count has not
    # moved for 2 s (at most 60 s).
    d=0 same=0
    for (( i = 0; i < 600; i++ )); do
        nd=$("$BUILDDIR/tests/sockcmd" "$tmp/$name.ctl" status bytes.digests 2>/dev/null || echo 0)
        [[ $nd =~ ^[0-9]+$ ]] || nd=0
        if (( nd > 0 && nd == d )); then same=$((same + 1)); else same=0; fi
        d=$nd
        (( d >= nblocks * 32 || same >= 20 )) && break
        kill -0 "$lpid" 2>/dev/null || break
        sleep 0.1
    done
    dig_s=$(awk -v i="$i" 'BEGIN { printf "%.1f", i / 10 }')
    "$BUILDDIR/tests/sockcmd" "$tmp/$name.ctl" pause >/dev/null ||
        echo "$ME: could not pause the background copy of $name" >&2
    # Seeded blocks in the second half of the range whose digests are in
    # (the copy, paused, is near the start of the image).
    pick_offsets $((d / 32))
    f0=$(sockcmd_status "$tmp/$name.ctl" fetches.ondemand)
    s0=$(sockcmd_status "$tmp/$name.ctl" bytes.seeded)
    p0=$(sockcmd_status "$tmp/$name.ctl" progress)
    LS_RESULT=$("$LAT" -n "$LAT_N" -f "$tmp/lat.off" -o "$tmp/$name.samples" \
                "nbd+unix:///?socket=$tmp/$name.sock" 2>&1) || LS_RESULT=FAIL
    f1=$(sockcmd_status "$tmp/$name.ctl" fetches.ondemand)
    s1=$(sockcmd_status "$tmp/$name.ctl" bytes.seeded)
    # Statistics over the misses: a read under 0.1 ms found its block
    # already present (an earlier read's seed job had brought it).
    if [[ $LS_RESULT != FAIL ]]; then
        LS_RESULT=$(python3 - "$tmp/$name.samples" <<'PY'
import sys
us = [int(l.split()[1]) for l in open(sys.argv[1]) if l.strip()]
hits = sum(1 for u in us if u < 100)
m = sorted(u for u in us if u >= 100)
if not m:
    print("no misses measured (%d reads, all under 0.1 ms)" % len(us)); sys.exit(0)
p = lambda q: m[max(1, (len(m) * q + 99) // 100) - 1]
print("n=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d (%d reads under 0.1 ms, cache hits, left out)"
      % (len(m), p(50), p(90), p(99), m[-1], hits))
PY
)
    fi
    LS_NOTE="digests of blocks 0-$((d / 32)) of $nblocks in after ${dig_s} s; reads in blocks $((d / 64))-$((d / 32)); copy paused at progress $p0; during the reads: on-demand fetches $(delta "$f0" "$f1"), bytes.seeded +$(delta "$s0" "$s1")"
else
    LS_NOTE="proxy did not start: $(tail -3 "$tmp/$name.log")"
fi
stop_pid "$lpid" "$name proxy"
rm -f "$tmp/$name.img" "$tmp/$name.bm"
record lat-seed "$LS_RESULT" "$LS_NOTE"
echo "    $LS_RESULT; $LS_NOTE"
echo "  latency: the same reads through a proxy without seeds (misses served by the source)"
run_lat lat-source "$tmp/lat.off" "xnbd://$a_new/"
record lat-source "$L_RESULT" "on-demand fetches $L_MISSES"
echo "    $L_RESULT (on-demand fetches $L_MISSES)"
{
    echo "# latency samples (offset us start_s), seeded then source"
    cat "$tmp/lat-seed.samples" "$tmp/lat-source.samples" 2>/dev/null || true
    for n in no-seeds seed-old inplace-seed inplace-warm lat-seed; do
        [[ -f $tmp/$n.log ]] || continue
        echo "# log of $n:"
        sed 's/^/#   /' "$tmp/$n.log"
    done
} >> "$TRACE"

stop_all
wan down >/dev/null || echo "$ME: wan-emu down failed" >&2
wan_up=0
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------- Table
python3 - "$results" "$A_NEW" "${A_INP:-{\}}" "${A_RAM:-{\}}" "$rtt_s" "$rate_bps" "$mode_line" "$DATA_LABEL" \
    "$load_before" "$load_after" "$(nproc)" "$IX_OUT" "$SSL_OUT" "$ZSTD_LEVEL" \
    "$(du -k --apparent-size "$NEW" | cut -f1)" "$ALLOC" "${#ALL_IMGS[@]}" > "$tmp/table.txt" <<'PY'
import json, os, re, sys, time
(path, a_new, a_inp, a_ram, rtt, rate, mode, label, load0, load1, ncpu, ix, ssl, level,
 size_k, alloc, nimg) = sys.argv[1:]
alloc = int(alloc)
A, I, R = json.loads(a_new), json.loads(a_inp), json.loads(a_ram)
rtt, rate, ncpu = float(rtt), int(rate), int(ncpu)
# Each key's runs; the row shown is its median run (by time; the lower
# middle one for an even count), with the range of the times.
runs_of = {}
for r in open(path):
    if r.strip():
        f = r.rstrip("\n").split("\t")
        runs_of.setdefault(f[0], []).append(f)
def num(t):
    return float(t) if re.fullmatch(r"[0-9.]+", t) else None
# The link's ceiling (link_ceiling in wan-lib.sh): the median pass.
crows = sorted(runs_of.pop("ceiling", []), key=lambda r: float(r[1]))
cmid = crows[(len(crows) - 1) // 2] if crows else None
ceil = [float(r[1]) for r in crows]
ceil_payload, ceil_ratio = (float(cmid[1]), float(cmid[3])) if cmid else (None, None)
rows, spread = {}, {}
for k, rs in runs_of.items():
    ok = sorted((r for r in rs if num(r[1]) is not None), key=lambda r: num(r[1]))
    if len(ok) < len(rs) or not ok:    # a failed run: show it, not a median
        rows[k] = next(r for r in rs if num(r[1]) is None)
        continue
    rows[k] = ok[(len(ok) - 1) // 2]
    if len(ok) > 1:
        st = [re.search(r"stolen (\d+) ms", r[9]) for r in rs]
        spread[k] = "%.3f-%.3f (%d runs: %s s; CPU stolen %s ms)" % (
            num(ok[0][1]), num(ok[-1][1]), len(ok), ", ".join(r[1] for r in rs),
            ", ".join(m.group(1) if m else "?" for m in st))
MB = 1e6
pct = lambda a, b: 100.0 * a / b if b else 0.0
print("Deduplication benchmark, %s, %d CPUs, load average before %s, after %s"
      % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), ncpu, load0, load1))
print("data: %s; images %d MiB (sparse ext4)" % (label, int(size_k) // 1024))
if R:
    print("      VM RAM: two runs of one small VM (QEMU TCG, Debian cloud kernel, busybox initramfs),"
          " %d MiB memory-backend files, kept after the guest printed its ready line and QEMU quit"
          % (R["blocks"] * 4096 // 1048576))
print("WAN: RTT %g ms, %g Mbit/s (wan-emu %s); xnbd:// with zstd -%s"
      % (rtt * 1e3, rate / 1e6, mode, level))
print("caches at the destination in %s" % os.environ.get("BENCH_TMPDIR", os.environ.get("TMPDIR", "/tmp")))
nruns = max((len(v) for k, v in runs_of.items() if k not in ("nbdcopy", "lat-seed", "lat-source")), default=1)
print("time: the median of %d run%s of each xnbd migration (passes one after the other); range below"
      % (nruns, "s" if nruns > 1 else ""))
print()
def share(name, a, seed="old"):
    print("%-34s non-zero blocks %7d (%6.1f MB, %4.1f%% zero); found in %s at any offset %5.1f%%,"
          " at the same offset %5.1f%%" % (name, a["nonzero"], a["nonzero"] * 4096 / MB,
                                          100 - pct(a["nonzero"], a["blocks"]), seed,
                                          pct(a["any"], a["nonzero"]), pct(a["same"], a["nonzero"])))
share("new (fresh debootstrap + pkgs):", A)
if I:
    share("new-inplace (old + pkgs in place):", I)
if R:
    share("vm2.ram (VM RAM, 2nd run):", R, "vm1.ram")
print()
def limit(a, seeds):
    if seeds:
        b = a["zstd_unseeded"] + 32 * a["nonzero"]
    else:
        b = a["zstd_all"]
    return b, b * 8 / rate + 2 * rtt
runs = [("no-seeds", "xnbd-proxy, no seeds", A, False),
        ("seed-old", "xnbd-proxy --seed old", A, True),
        ("inplace-seed", "xnbd-proxy --seed old (in-place)", I, True),
        ("inplace-warm", "  the same, digests warm at A", I, True),
        ("nbdcopy", "nbdcopy from nbdkit file", A, None),
        ("ram-no-seeds", "VM RAM vm2: no seeds", R, False),
        ("ram-seed", "VM RAM vm2: --seed vm1.ram", R, True)]
print("%-33s | %7s | %8s | %8s | %7s | %7s | %9s | %9s | %9s | %9s | %8s | %8s"
      % ("migration (of new unless said)", "time s", "link MB", "limit MB", "link/lim", "limit s",
         "time/lim", "time/phys", "seeded MB", "fetched MB", "zero MB", "digest MB"))
# time/phys: the same limit bytes at the rate one plain TCP stream got
# through this link in this run (the emulator's real ceiling), + 2 x RTT.
phys = lambda lb: lb / ceil_payload + 2 * rtt if ceil_payload else None
notes = []
for key, nm, a, seeds in runs:
    r = rows.get(key)
    if not r or not a:
        continue
    if seeds is None:
        lb = a["nonzero"] * 4096
        ls = lb * 8 / rate + 2 * rtt
    else:
        lb, ls = limit(a, seeds)
    t = r[1]
    tv = float(t) if re.fullmatch(r"[0-9.]+", t) else None
    link = int(r[2])
    f = lambda v: "%.1f" % (int(v) / MB) if re.fullmatch(r"[0-9]+", v) else "-"
    ps = phys(lb)
    print("%-33s | %7s | %8.1f | %8.1f | %7.2f | %7.2f | %9s | %9s | %9s | %9s | %8s | %8s"
          % (nm, t, link / MB, lb / MB, link / lb, ls, "%.2f" % (tv / ls) if tv else "-",
             "%.2f" % (tv / ps) if tv and ps else "-", f(r[4]), f(r[3]), f(r[5]), f(r[6])))
    extra = ""
    if re.fullmatch(r"[0-9]+", r[7]) and re.fullmatch(r"[0-9]+", r[8]) and int(r[8]):
        extra = "; wire rx %.1f MB for %.1f MB of NBD (%.3f)" % (int(r[7]) / MB, int(r[8]) / MB,
                                                                 int(r[7]) / int(r[8]))
    if key in spread:
        lo, hi = (float(x) for x in spread[key].split()[0].split("-"))
        extra += "; time %s, range %s, time/lim %.2f-%.2f" % (t, spread[key], lo / ls, hi / ls)
        if ps:
            extra += ", time/phys %.2f-%.2f" % (lo / ps, hi / ps)
    notes.append("  %s: %s%s" % (key, r[9], extra))
print("limit MB: zstd -%s of the non-zero blocks in no seed + 32 B per non-zero block (seeded runs);"
      " zstd -%s of all non-zero blocks (no seeds); the raw non-zero bytes (nbdcopy)." % (level, level))
print("limit s = limit MB / rate + 2 x RTT.  link = rx+tx bytes of the dst veth (its segments, headers"
      " included).  targets: link/lim <= 1.05, time/lim <= 1.15")
if ceil_payload:
    print("time/phys = time / (limit MB / C + 2 x RTT), C = %.2f MB/s: the payload one plain TCP stream"
          " carried through this link (median of %d passes: %s MB/s; the stream's last 3/4, i.e. after"
          " its start-up), %.1f%% of the nominal rate; %.3f frame bytes per payload byte"
          % (ceil_payload / MB, len(ceil), ", ".join("%.2f" % (c / MB) for c in ceil),
             100.0 * ceil_payload * 8 / rate, ceil_ratio))
print("\n".join(notes))
print()
for key, nm in (("lat-seed", "miss served from the seed"), ("lat-source", "miss served by the source")):
    r = rows.get(key)
    if not r:
        continue
    m = dict(re.findall(r"(\w+)=(\d+)", r[1]))
    if "p50_us" in m:
        left = re.search(r"\((.*)\)$", r[1])
        print("4 KiB read, %-26s p50 %7.2f ms  p90 %7.2f ms  p99 %7.2f ms  max %7.2f ms  (n=%s%s; %s)"
              % (nm + ":", int(m["p50_us"]) / 1e3, int(m["p90_us"]) / 1e3, int(m["p99_us"]) / 1e3,
                 int(m["max_us"]) / 1e3, m.get("n"), ", " + left.group(1) if left else "", r[2]))
    else:
        print("4 KiB read, %-26s %s (%s)" % (nm + ":", r[1], r[2]))
print()
m = re.search(r"build: ([0-9.]+) s wall, (\d+) blocks hashed in ([0-9.]+) s \(([0-9.]+) MiB/s\), "
              r"(\d+) blocks indexed, table (\d+) bytes = ([0-9.]+) bytes/block", ix)
rl = re.search(r"reload: ([0-9.]+) s wall", ix)
s = ssl.split()
sslk = float(s[-1].rstrip("k")) if s and s[-1].endswith("k") else None
if m:
    thr = alloc / float(m.group(3)) if float(m.group(3)) else 0
    print("indexing %s images (%.1f MB allocated of %d blocks): hashed in %s s = %.0f MB/s of allocated data;"
          " %s distinct non-zero blocks indexed; table %s B = %s B/block (RAM); reload from the index file %s s"
          % (nimg, alloc / MB, int(m.group(2)), m.group(3), thr / MB, m.group(5), m.group(6), m.group(7),
             rl.group(1) if rl else "-"))
    if sslk:
        ref = sslk * 1000
        print("openssl speed -multi %d -evp sha256 -bytes 4096: %.0f MB/s (all cores; best of 3, as the indexing);"
              " indexing / openssl = %.2f (target >= 0.9)" % (ncpu, ref / MB, thr / ref))
else:
    print("indexing: %s" % ix.replace("\n", "; "))
PY
tee "$OUT" < "$tmp/table.txt"
echo "dedup: table saved to $OUT; details in $TRACE"
