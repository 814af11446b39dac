#!/usr/bin/env bash
# Long soak run of xnbd-proxy over an emulated WAN (make soak).  Not a test
# of `make check`: a benchmark-like run that looks for defects that only
# show after many faults in a row.
#
#   scripts/soak.sh BUILDDIR          (as root; BUILDDIR=build-asan for ASan)
#
# One xnbd-server (read-only, --wan-listen: xnbd:// with zstd) serves a
# generated image (gen-image.py: 40% random, 30% zero, 30% text blocks) in
# the "src" namespace of scripts/wan-emu/wan-emu for the whole run.  Cycles
# are repeated until SOAK_MINUTES are used up; each cycle (SOAK_CYCLE_S):
#
#   1. a fresh cache and bitmap; xnbd-proxy in the "dst" namespace, target
#      xnbd://, --bg-rate capped so that the background copy alone would
#      take the whole cycle (on-demand fetches shorten it); clients use its unix socket;
#   2. a crashload writer (journalled writes, FUA, flushes; SOAK_WRITE_RATE
#      requests a second) for the whole cycle, and a checked reader (scripts/soak-reader.py: random regions,
#      every sector must be the source's or an undamaged stamp of this
#      cycle's writers at that offset); then cache-all;
#   3. at seeded random moments: the link cut for 10-30 s (wan0 down in
#      src), the copy paused for 3-8 s and resumed, the rate limit raised;
#   4. once, at a seeded moment in 50-65% of the cycle, the proxy is
#      restarted with the same files: SIGTERM in even cycles, SIGKILL in
#      odd ones.  The writer's connection dies with it.  After the restart
#      (cache-all again), `crashload verify` reads the whole disk and checks
#      it against the source and the writer's journal (after SIGKILL this is
#      I2: flushed writes kept, every other sector the source or a write;
#      after SIGTERM additionally no acked write may be lost); what it read
#      (--dump) is the base the next writer session is checked against;
#   5. a second writer session to near the end of the cycle; the copy must
#      complete; `detach`; the writer ends; with the link DOWN (the source
#      unreachable, as after a migration) `crashload verify` checks the
#      whole disk against the base and the second journal; stop (SIGTERM).
#
# With seeds (SOAK_SEEDS=1, the default) every proxy runs with --seed: a
# file made once from the source image (its blocks SOAK_SEED_SHIFT blocks
# further on, 60 % of them; random data elsewhere), indexed once (--index,
# kept across cycles), so that most blocks come from the seed, verified
# against the source's digests (I4); and at a seeded moment early in each
# cycle, while the copy runs, 256 of the seed's blocks that match the source are
# overwritten behind the proxy's back: the verifications then show that
# no block came from a seed block that no longer matched (the restarted
# proxy also finds the seed changed and indexes it again).
#
# Checked every cycle (a failure is recorded, the run goes on; the script
# exits 1 at the end if any cycle failed): both verifications pass; the
# writers' requests never failed while connected; the reader saw no bad
# sector and no read error; every proxy exit is the expected one (0 after
# SIGTERM, 137 after SIGKILL) and the proxy never died by itself; no
# sanitizer report in its logs; the copy completed and detach worked;
# status counters sane: per proxy process, bytes.fetched + zero_skipped <=
# the bytes missing at its start + fetches.errors x 4 MiB (a failed fetch
# may be repeated), and blocks present = total at the end; xnbd-server
# alive.  Re-fetches after failures are reported: the blocks that were
# present before a restart but not after it (bits not yet persisted).
#
# Environment:
#   SOAK_MINUTES   total run time (default 30)
#   SOAK_CYCLE_S   cycle length in seconds (default min(300, total); >= 120)
#   SOAK_SEED      seed of every random choice (default: from the clock;
#                  printed, and in the table: rerun with it to reproduce)
#   SOAK_SIZE_MIB  image size (default 256)
#   SOAK_RTT / SOAK_RATE   the emulated link (default 20ms / 100mbit)
#   SOAK_WRITE_RATE  writer requests per second (default 100: the writers'
#                  partial writes of missing blocks are fetches too)
#   SOAK_READ_MAX_KIB  largest read of the checked reader (default 2048,
#                  QEMU's usual largest request; reads of fragmented
#                  missing ranges make one fetch per missing run, see
#                  tests/test-proxy-fragmented-read.sh)
#   SOAK_SEEDS     1 (default): proxies run with a seed, see above; 0: none
#   SOAK_SEED_SHIFT  blocks by which the seed's copy of the source is moved
#                  (default 97: found by digest at another offset)
#   SOAK_TMPDIR    scratch directory (default $TMPDIR or /tmp); kept with
#                  all logs when a cycle failed (path printed)
#
# Writes the per-cycle table to BUILDDIR/soak.txt.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/bench" && pwd)
# shellcheck source=bench/proxy.sh
. "$BENCH_DIR/proxy.sh"        # bench_init, die, kill_pid, bench_tmpdir
bench_init soak.sh "$@"
SRCDIR=$PWD
WAN=$SRCDIR/scripts/wan-emu/wan-emu
READER=$SRCDIR/scripts/soak-reader.py
CTL=$BUILDDIR/xnbd-ctl
CRASHLOAD=$BUILDDIR/tests/crashload
SOCKCMD=$BUILDDIR/tests/sockcmd
OUT=$BUILDDIR/soak.txt

MINUTES=${SOAK_MINUTES:-30}
SIZE_MIB=${SOAK_SIZE_MIB:-256}
RTT=${SOAK_RTT:-20ms}
RATE=${SOAK_RATE:-100mbit}
SEED=${SOAK_SEED:-$(( $(date +%s%N) / 1000 % 1000000 ))}
WRITE_RATE=${SOAK_WRITE_RATE:-100}
READ_MAX_KIB=${SOAK_READ_MAX_KIB:-2048}
SEEDS=${SOAK_SEEDS:-1}
SEED_SHIFT=${SOAK_SEED_SHIFT:-97}
[[ $SEEDS == 0 || $SEEDS == 1 ]] || die "SOAK_SEEDS must be 0 or 1, not '$SEEDS'"
[[ $SEED_SHIFT =~ ^[0-9]+$ ]] || die "SOAK_SEED_SHIFT must be a non-negative integer, not '$SEED_SHIFT'"
[[ $WRITE_RATE =~ ^[1-9][0-9]*$ ]] || die "SOAK_WRITE_RATE must be a positive integer, not '$WRITE_RATE'"
[[ $READ_MAX_KIB =~ ^[1-9][0-9]*$ ]] && (( READ_MAX_KIB % 4 == 0 )) ||
    die "SOAK_READ_MAX_KIB must be a positive multiple of 4, not '$READ_MAX_KIB'"
[[ $MINUTES =~ ^[1-9][0-9]*$ ]] || die "SOAK_MINUTES must be a positive integer, not '$MINUTES'"
[[ $SIZE_MIB =~ ^[1-9][0-9]*$ ]] && (( SIZE_MIB >= 16 )) ||
    die "SOAK_SIZE_MIB must be an integer >= 16, not '$SIZE_MIB'"
[[ $SEED =~ ^[0-9]+$ ]] || die "SOAK_SEED must be a non-negative integer, not '$SEED'"
TOTAL_S=$(( MINUTES * 60 ))
CYCLE_S=${SOAK_CYCLE_S:-$(( TOTAL_S < 300 ? TOTAL_S : 300 ))}
[[ $CYCLE_S =~ ^[0-9]+$ ]] && (( CYCLE_S >= 120 )) ||
    die "SOAK_CYCLE_S must be an integer >= 120 (a cycle needs room for its faults), not '$CYCLE_S'"
NCYCLES=$(( TOTAL_S / CYCLE_S ))
(( NCYCLES >= 1 )) || NCYCLES=1
(( EUID == 0 )) || die "must run as root (network namespaces and tc, via scripts/wan-emu/wan-emu)"
for f in "$XNBD" "$PROXY" "$CTL" "$CRASHLOAD" "$SOCKCMD" "$BUILDDIR/wan-relay"; do
    [[ -x $f ]] || die "$f not found; run 'make' (or 'make BUILDDIR=$BUILDDIR') first"
done
for tool in ip python3 sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not found; run scripts/install-deps.sh"
done
/usr/bin/python3 -c 'import nbd' 2>/dev/null ||
    die "python3-libnbd is missing (the checked reader needs it); run scripts/install-deps.sh"
ip netns add "xnbd-soakprobe-$$" 2>/dev/null ||
    die "cannot create network namespaces here (needs CONFIG_NET_NS)"
ip netns delete "xnbd-soakprobe-$$"

export XNBD_BUILD=$BUILDDIR       # wan-emu takes wan-relay from here
export LSAN_OPTIONS=suppressions=$SRCDIR/tests/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}
WNAME=soak$$
NS_SRC=xnbd-$WNAME-src
NS_DST=xnbd-$WNAME-dst
PORT=10810
wan_up=0
PIDS=()                           # every background process we started
failed_any=0

wan() { "$WAN" --name "$WNAME" "$@"; }

forget_pid() {
    local p keep=()
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}
stop_pid() { kill_pid "$1" "$2"; forget_pid "$1"; }

link_set() {    # up|down: both ends of the link
    ip netns exec "$NS_SRC" ip link set wan0 "$1" || true
    ip netns exec "$NS_DST" ip link set wan0 "$1" || true
}

bench_cleanup_extra() {
    local p
    set +e
    for p in "${PIDS[@]}"; do kill_pid "$p" "pid $p" 2>/dev/null; done
    PIDS=()
    if (( wan_up )); then
        wan down >/dev/null 2>&1 || echo "$ME: 'wan-emu --name $WNAME down' failed" >&2
    fi
    if (( failed_any )) && [[ -n $tmp && -d $tmp ]]; then
        # Keep the evidence: bench_cleanup removes $tmp, so move it aside.
        local keepdir=${tmp}.kept
        rm -f "$tmp"/source.img "$tmp"/c*/cache.img "$tmp"/c*/base*.img 2>/dev/null
        mv "$tmp" "$keepdir" && echo "$ME: logs of the failed run kept in $keepdir" >&2
    fi
}
bench_tmpdir soak
chmod 755 "$tmp"

# ---------------------------------------------------------------- helpers
now() { date +%s; }
# wait_until SECONDS CMD...: retry CMD every 0.2 s; false after SECONDS.
wait_until() {
    local end=$(( $(now) + $1 ))
    shift
    while ! "$@" >/dev/null 2>&1; do
        (( $(now) < end )) || return 1
        sleep 0.2
    done
}
# st CTL PATH...: status members (sockcmd), or fails.
st() { local c=$1; shift; "$SOCKCMD" -t 10 "$c" status "$@"; }
st_is() { [[ $(st "$1" "$2" 2>/dev/null) == "$3" ]]; }
ctl_line() { "$SOCKCMD" -t 30 "$1" "$2"; }
ctl_ok() { local r; r=$(ctl_line "$1" "$2") && [[ $r == '{"ok":true'* ]] || { echo "$r"; return 1; }; }
link_bytes() {
    ip netns exec "$NS_DST" ip -s -j link show dev wan0 | python3 -c '
import json, sys
s = json.load(sys.stdin)[0]["stats64"]
print(s["rx"]["bytes"] + s["tx"]["bytes"])'
}
pid_alive() { kill -0 "$1" 2>/dev/null; }
# wait_pid PID SECONDS: wait for a child to exit (bounded); sets WAIT_RC
# (its status, or "timeout" and it is then killed).
wait_pid() {
    local end=$(( $(now) + $2 ))
    while pid_alive "$1"; do
        if (( $(now) >= end )); then
            kill -KILL "$1" 2>/dev/null || true
            wait "$1" 2>/dev/null || true
            forget_pid "$1"
            WAIT_RC=timeout
            return 0
        fi
        sleep 0.2
    done
    WAIT_RC=0
    wait "$1" 2>/dev/null || WAIT_RC=$?
    forget_pid "$1"
}

# ---------------------------------------------------------------- setup
img=$tmp/source.img
echo "soak: seed $SEED (reproduce with SOAK_SEED=$SEED), $NCYCLES cycle(s) of $CYCLE_S s, image ${SIZE_MIB} MiB, link $RTT $RATE"
python3 "$BENCH_DIR/gen-image.py" "$SIZE_MIB" "$img" "$SEED" >/dev/null
img_sha=$(sha256sum < "$img")
IMG_BYTES=$(stat -c %s "$img")
NONZERO=$(python3 - "$img" <<'PY'
import sys
z = bytes(4096); n = 0
with open(sys.argv[1], "rb") as f:
    while True:
        b = f.read(1 << 22)
        if not b: break
        n += sum(1 for i in range(0, len(b), 4096) if b[i:i + 4096] != z[:len(b[i:i + 4096])])
print(n * 4096)
PY
)
# The seed: the source's blocks SEED_SHIFT blocks further on (60 % of
# them, the rest random), and the list of seed blocks that match the
# source (candidates for the mutations of each cycle).
PROXY_SEED_ARGS=()
if (( SEEDS )); then
    python3 - "$img" "$tmp/seed.img" "$tmp/seed.matching" "$SEED" "$SEED_SHIFT" <<'PY'
import os, random, sys
src, out, matching, seed, shift = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
bs, z = 4096, bytes(4096)
n = (os.path.getsize(src) + bs - 1) // bs
rng = random.Random(seed)
# Seed block j is source block j - shift (60 % of the non-zero ones),
# written in order, one block in memory at a time.
with open(src, "rb") as f, open(out, "wb") as o, open(matching, "w") as m:
    for j in range(n):
        f.seek(((j - shift) % n) * bs)
        b = f.read(bs).ljust(bs, b"\0")
        if b != z and rng.random() < 0.6:
            o.write(b)
            m.write("%d\n" % j)
        else:
            o.write(rng.randbytes(bs))
PY
    PROXY_SEED_ARGS=(--seed "$tmp/seed.img" --index "$tmp/seed.idx")
    echo "soak: seed $tmp/seed.img: $(wc -l < "$tmp/seed.matching") blocks of the source, $SEED_SHIFT blocks on"
fi

# Copy rate: the background copy alone would take the whole cycle; the
# clients' on-demand fetches shorten it to about 3/4.
# (With seeds: of the blocks the seed does not hold, which the copy must
# fetch; those in the seed land as fast as the proxy checks them.)
TO_FETCH=$NONZERO
(( SEEDS )) && TO_FETCH=$(( NONZERO - $(wc -l < "$tmp/seed.matching") * 4096 ))
(( TO_FETCH > 0 )) || TO_FETCH=$NONZERO
BG_RATE=$(( TO_FETCH / CYCLE_S ))
echo "soak: $NONZERO non-zero bytes; background rate cap $BG_RATE B/s"

up_out=$(wan up --rtt "$RTT" --rate "$RATE" --forward "$PORT" 2>&1) ||
    { echo "$up_out" >&2; die "wan-emu up failed"; }
wan_up=1
MODE=$(grep -m1 '^wan-emu: mode' <<< "$up_out" || echo "wan-emu: mode unknown")
echo "soak: ${MODE#wan-emu: }"
src_addr=$(wan addr src)
ip netns exec "$NS_SRC" "$XNBD" -r -W "$src_addr:$PORT" -p "$tmp/server.pid" "$img" \
    2>"$tmp/server.log" &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
wait_until 20 test -s "$tmp/server.pid" || die "xnbd-server did not start: $(cat "$tmp/server.log")"
TARGET="xnbd://$(wan relay-addr "$PORT")/"

RANDOM=$SEED
results=$tmp/results.tsv
: > "$results"
T_START=$(now)

# ---------------------------------------------------------------- one cycle
# Globals per cycle: C (dir), CTLS, PSOCK, URI, FAILS (array of reasons).
fail_c() { FAILS+=("$*"); failed_any=1; echo "soak: cycle $cyc: FAIL: $*" >&2; }

# start_proxy_c N [--cache-all]: proxy instance N of this cycle; sets PPID_C.
start_proxy_c() {
    local n=$1
    shift
    rm -f "$C/proxy.pid"
    ip netns exec "$NS_DST" "$PROXY" --target "$TARGET" --cache "$C/cache.img" \
        --bitmap "$C/cache.bm" --control "$CTLS" -u "$PSOCK" -p "$C/proxy.pid" \
        --bg-rate "$BG_RATE" "${PROXY_SEED_ARGS[@]}" "$@" 2>"$C/proxy$n.log" &
    PPID_C=$!
    PIDS+=("$PPID_C")
    if ! wait_until 60 test -s "$C/proxy.pid" || ! wait_until 60 st_is "$CTLS" state proxying; then
        fail_c "proxy instance $n did not start (see proxy$n.log)"
        return 1
    fi
}

# status_json FILE: the proxy's status now (JSON) into FILE.
status_json() { ctl_line "$CTLS" status > "$1" 2>/dev/null || echo '{}' > "$1"; }
jget() { status_get "$1" "$2"; }

# check_counters LOG END N: per proxy process, fetched + zero_skipped
# within what it had to fetch (+ 4 MiB per failed fetch).  What was missing
# at its start is in its log (clients may read before a status is taken).
check_counters() {
    local miss fetched zs errs bs seeded stale
    read -r miss bs < <(sed -n 's/.*: \([0-9]*\) of \([0-9]*\) blocks of \([0-9]*\) bytes present$/\1 \2 \3/p' "$1" |
                        awk 'NR == 1 { print $2 - $1, $3 }')
    fetched=$(jget "$2" bytes.fetched) zs=$(jget "$2" bytes.zero_skipped) errs=$(jget "$2" fetches.errors)
    seeded=$(jget "$2" bytes.seeded) stale=$(jget "$2" fetches.seed_stale)
    for v in miss bs fetched zs errs seeded stale; do
        [[ ${!v} =~ ^[0-9]+$ ]] || { fail_c "instance $3: status member $v unreadable"; return 0; }
    done
    C_FETCHED=$(( C_FETCHED + fetched )) C_ZS=$(( C_ZS + zs )) C_ERRS=$(( C_ERRS + errs ))
    C_SEEDED=$(( C_SEEDED + seeded )) C_STALE=$(( C_STALE + stale ))
    if (( fetched + zs > miss * bs + errs * 4194304 )); then
        fail_c "instance $3: fetched $fetched + zero-skipped $zs > missing at start $((miss * bs)) + $errs failed fetches x 4 MiB"
    fi
}

# asan_check LOG: a sanitizer report in a log is a failure.
asan_check() {
    if grep -qE 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer' "$1"; then
        fail_c "sanitizer report in ${1##*/}: $(grep -m1 -E 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer' "$1")"
    fi
}

# verify_c JOURNAL BASE DUMP NAME: crashload verify; sets V_LOST (acked but
# unflushed writes not kept) and V_LINE.
verify_c() {
    local rc=0 args=(verify --uri "$URI" --journal "$1" --source "$2")
    [[ -z $3 ]] || args+=(--dump "$3")
    timeout 900 "$CRASHLOAD" "${args[@]}" > "$C/$4.out" 2>&1 || rc=$?
    V_LINE=$(grep '^verify: sectors' "$C/$4.out" || tail -1 "$C/$4.out")
    V_LOST=$(sed -n 's/.* \([0-9]*\) unflushed writes not kept.*/\1/p' "$C/$4.out")
    [[ $V_LOST =~ ^[0-9]+$ ]] || V_LOST=0
    if (( rc != 0 )); then
        fail_c "$4 failed (exit $rc): $(grep -m3 -E 'MISMATCH|crashload:' "$C/$4.out" | tr '\n' ' ')"
        return 1
    fi
}

# writer_start N SECONDS: crashload writer session N; sets WPID.
writer_start() {
    local wseed=$(( SEED * 1000 + cyc * 10 + $1 ))
    echo "$wseed" >> "$C/seeds"
    timeout $(( $2 + 120 )) "$CRASHLOAD" write --uri "$URI" --journal "$C/journal$1" \
        --seed "$wseed" --seconds "$2" --rate "$WRITE_RATE" > "$C/write$1.out" 2>&1 &
    WPID=$!
    PIDS+=("$WPID")
    wait_until 30 test -s "$C/journal$1" || fail_c "writer $1 did not start: $(cat "$C/write$1.out")"
}
# writer_end N PID: wait for it; its requests must not have failed while
# connected (exit 1), nor may it have crashed.
writer_end() {
    wait_pid "$2" 200
    if [[ $WAIT_RC != 0 ]]; then
        fail_c "writer $1 ended with status $WAIT_RC: $(tail -2 "$C/write$1.out" | tr '\n' ' ')"
    fi
    local w
    w=$(sed -n 's/^write: \([0-9]*\) requests issued: \([0-9]*\) writes acked.*/\1 \2/p' "$C/write$1.out")
    read -r a b <<< "${w:-0 0}"
    C_REQS=$(( C_REQS + a )) C_ACKED=$(( C_ACKED + b ))
}

run_cycle() {
    cyc=$1
    C=$tmp/c$cyc
    mkdir -p "$C"
    CTLS=$C/ctl PSOCK=$C/proxy.sock URI="nbd+unix:///?socket=$C/proxy.sock"
    FAILS=()
    C_FETCHED=0 C_ZS=0 C_ERRS=0 C_REQS=0 C_ACKED=0 C_SEEDED=0 C_STALE=0
    local t0 l0 kind restart_at cut_at cut_len pause_at pause_len now_s mut_at
    local lost_blocks=- reconnects=0 rd='-' restarts=0 verdict
    t0=$(now)
    l0=$(link_bytes)
    # The seeded plan of this cycle.
    (( cyc % 2 )) && kind=KILL || kind=TERM
    restart_at=$(( CYCLE_S * 50 / 100 + RANDOM % (CYCLE_S * 15 / 100 + 1) ))
    cut_len=$(( 10 + RANDOM % 21 ))
    # The cut falls while the copy runs, and ends 5 s before the restart
    # (a proxy starting with the source unreachable is another scenario).
    cut_at=$(( CYCLE_S * 8 / 100 + RANDOM % (restart_at - cut_len - 5 - CYCLE_S * 8 / 100 + 1) ))
    pause_at=$(( CYCLE_S * 5 / 100 + RANDOM % (CYCLE_S * 30 / 100 + 1) ))
    pause_len=$(( 3 + RANDOM % 6 ))
    # Early: the copy has taken few of the seed's blocks yet.
    mut_at=$(( CYCLE_S * 3 / 100 + RANDOM % (CYCLE_S * 15 / 100 + 1) ))
    local mut_plan=
    (( SEEDS )) && mut_plan=" seed_change_at=$mut_at"
    echo "soak: cycle $cyc: restart by SIG$kind at ${restart_at}s, link cut at ${cut_at}s for ${cut_len}s, pause at ${pause_at}s for ${pause_len}s${mut_plan:+, 256 seed blocks changed at ${mut_at}s}"
    printf '%s\n' "kind=$kind restart_at=$restart_at cut_at=$cut_at cut_len=$cut_len pause_at=$pause_at pause_len=$pause_len$mut_plan" > "$C/plan"

    : > "$C/seeds"
    if ! start_proxy_c 1; then
        printf '%s\t' "$cyc" "$kind" 0 0 0 0 0 0 - 0 0 0 0 0 - - - "$(cat "$C/plan")" >> "$results"
        echo "FAIL: ${FAILS[*]}" >> "$results"
        return 0
    fi
    local p1=$PPID_C
    status_json "$C/start1.json"
    /usr/bin/python3 "$READER" "$URI" "$img" "$C/seeds" "$C/reader.json" "$C/reader.stop" \
        "$(( SEED * 1000 + cyc ))" $(( CYCLE_S + 900 )) "$READ_MAX_KIB" > "$C/reader.out" 2>&1 &
    local rpid=$!
    PIDS+=("$rpid")
    writer_start 1 "$CYCLE_S"
    local w1=$WPID
    ctl_ok "$CTLS" cache-all >/dev/null || fail_c "cache-all refused"

    # The link cut runs on its own (the fault, not a wait).
    ( sleep "$cut_at"; link_set down; echo "$(date +%s) link down" >> "$C/events";
      sleep "$cut_len"; link_set up; echo "$(date +%s) link up" >> "$C/events" ) &
    local cutpid=$!
    PIDS+=("$cutpid")
    # The seed changes behind the proxy's back (I4): 256 of its blocks that
    # match the source get random data, in place.
    local mutpid=
    if (( SEEDS )); then
        local mseed=$(( SEED * 1000 + cyc ))
        ( sleep "$mut_at"
          shuf -n 256 --random-source=<(yes "$mseed") "$tmp/seed.matching" | while read -r b; do
              dd if=/dev/urandom of="$tmp/seed.img" bs=4096 seek="$b" count=1 conv=notrunc status=none
          done
          echo "$(date +%s) 256 seed blocks changed" >> "$C/events" ) &
        mutpid=$!
        PIDS+=("$mutpid")
    fi

    # Until the restart: pause/resume once.
    while (( (now_s = $(now) - t0) < restart_at )); do
        if (( pause_at >= 0 && now_s >= pause_at )); then
            ctl_ok "$CTLS" pause >/dev/null || fail_c "pause refused"
            wait_until 10 st_is "$CTLS" background.paused true || fail_c "status does not show the pause"
            sleep "$pause_len"
            ctl_ok "$CTLS" resume >/dev/null || fail_c "resume refused"
            pause_at=-1
        fi
        pid_alive "$p1" || break
        sleep 0.5
    done
    if ! pid_alive "$p1"; then
        wait_pid "$p1" 1
        fail_c "proxy instance 1 died by itself (status $WAIT_RC; see proxy1.log)"
    else
        status_json "$C/end1.json"
        kill -"$kind" "$p1"
        wait_pid "$p1" 60
        local want=0
        [[ $kind == KILL ]] && want=137
        [[ $WAIT_RC == "$want" ]] || fail_c "proxy instance 1 exit status $WAIT_RC after SIG$kind (expected $want)"
        restarts=1
    fi
    echo "$(date +%s) proxy 1 stopped by SIG$kind" >> "$C/events"
    check_counters "$C/proxy1.log" "$C/end1.json" 1
    writer_end 1 "$w1"

    # Instance 2 on the same files; the bits present now are what was
    # persisted.  Then cache-all, and the whole disk is checked.
    start_proxy_c 2 || { stop_pid "$rpid" reader; stop_pid "$cutpid" "link cut"; link_set up; return 0; }
    local p2=$PPID_C
    status_json "$C/start2.json"
    local pb pa
    pb=$(jget "$C/end1.json" blocks.present) pa=$(jget "$C/start2.json" blocks.present)
    [[ $pb =~ ^[0-9]+$ && $pa =~ ^[0-9]+$ ]] && lost_blocks=$(( pb > pa ? pb - pa : 0 ))
    ctl_ok "$CTLS" cache-all >/dev/null || fail_c "cache-all refused after the restart"
    if verify_c "$C/journal1" "$img" "$C/base1.img" verify1; then
        if [[ $kind == TERM ]] && (( V_LOST > 0 )); then
            fail_c "$V_LOST acked writes lost over a clean (SIGTERM) restart: $V_LINE"
        fi
    fi
    local v1_line=$V_LINE
    [[ -f $C/base1.img ]] || cp --sparse=always "$img" "$C/base1.img"
    ctl_ok "$CTLS" "rate $(( BG_RATE * 2 ))" >/dev/null || fail_c "rate refused"

    # Second writer session, to leave room for completion and the check.
    local left=$(( CYCLE_S - ($(now) - t0) - 30 ))
    (( left >= 10 )) || left=10
    writer_start 2 "$left"
    local w2=$WPID
    local end=$(( t0 + CYCLE_S + 120 ))
    while ! st_is "$CTLS" state complete; do
        if ! pid_alive "$p2"; then break; fi
        (( $(now) < end )) || break
        sleep 0.5
    done
    if ! pid_alive "$p2"; then
        wait_pid "$p2" 1
        fail_c "proxy instance 2 died by itself (status $WAIT_RC; see proxy2.log)"
    elif ! st_is "$CTLS" state complete; then
        fail_c "the copy did not complete within the cycle + 120 s: $(st "$CTLS" state blocks.missing last_error 2>&1)"
    else
        [[ $(st "$CTLS" blocks.missing 2>/dev/null) == 0 ]] || fail_c "state complete with blocks missing"
        local r
        r=$("$CTL" -c "$CTLS" detach 2>&1) || fail_c "detach failed: $r"
        wait_until 30 st_is "$CTLS" state detached || fail_c "state did not become detached"
    fi
    writer_end 2 "$w2"
    wait_pid "$cutpid" $(( cut_at + cut_len + 60 ))
    [[ -z $mutpid ]] || wait_pid "$mutpid" $(( mut_at + 60 ))
    status_json "$C/end2.json"
    # The source is gone for the final check: a detached proxy needs none.
    link_set down
    verify_c "$C/journal2" "$C/base1.img" "" verify2 || true
    local v2_line=$V_LINE
    link_set up
    touch "$C/reader.stop"
    wait_pid "$rpid" 30
    [[ $WAIT_RC == 0 ]] || fail_c "reader ended with status $WAIT_RC: $(tail -3 "$C/reader.out" | tr '\n' ' ')"
    if pid_alive "$p2"; then
        kill -TERM "$p2"
        wait_pid "$p2" 60
        [[ $WAIT_RC == 0 ]] || fail_c "proxy instance 2 exit status $WAIT_RC after SIGTERM (expected 0)"
    fi
    check_counters "$C/proxy2.log" "$C/end2.json" 2
    [[ $(jget "$C/end2.json" blocks.present) == "$(jget "$C/end2.json" blocks.total)" ]] ||
        fail_c "blocks present $(jget "$C/end2.json" blocks.present) != total at the end"
    asan_check "$C/proxy1.log"
    asan_check "$C/proxy2.log"
    pid_alive "$SERVER_PID" || fail_c "xnbd-server died"
    rd=$(python3 -c '
import json, sys
j = json.load(open(sys.argv[1]))
print("%d reads %.0f MB, %d stamped sectors, %d re-read, %d disconnects; %d errors, %d bad" % (
    j["reads"], j["bytes"] / 1e6, j["stamped_sectors"], j["reread_ok"], j["disconnects"],
    j["read_errors"], j["bad_sectors"]))
bad = j["read_errors"] + j["bad_sectors"]
sys.exit(1 if bad else 0)' "$C/reader.json" 2>&1) || fail_c "reader: $rd $(head -3 "$C/reader.out" | tr '\n' ' ')"
    # Connections lost or declared dead (stalled: no progress for a third of
    # --source-timeout, 20 s by default, so the longer cuts reach it).
    reconnects=$(cat "$C"/proxy*.log | grep -cE 'declaring it dead|connection to source .* lost' || true)
    local l1 dur
    l1=$(link_bytes)
    dur=$(( $(now) - t0 ))
    (( ${#FAILS[@]} == 0 )) && verdict=OK || { verdict="FAIL: ${FAILS[*]}"; failed_any=1; }
    local IFS=$'\t'
    echo "$cyc	$kind	$dur	$(( l1 - l0 ))	$C_FETCHED	$C_SEEDED	$C_STALE	$C_ZS	$lost_blocks	$C_ERRS	$reconnects	$restarts	$C_REQS	$C_ACKED	$rd	$v1_line	$v2_line	$(cat "$C/plan")	$verdict" >> "$results"
    echo "soak: cycle $cyc done in ${dur}s: $verdict"
    rm -f "$C/cache.img" "$C/base1.img"
}

for (( cyc = 1; cyc <= NCYCLES; cyc++ )); do
    run_cycle "$cyc"
done
[[ $(sha256sum < "$img") == "$img_sha" ]] || { echo "soak: FAIL: the source image changed (I6)" >&2; failed_any=1; }
asan_log_note=
if grep -qE 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer' "$tmp/server.log"; then
    asan_log_note="xnbd-server log has a sanitizer report"; failed_any=1
fi

python3 - "$results" "$SEED" "$NCYCLES" "$CYCLE_S" "$SIZE_MIB" "$IMG_BYTES" "$NONZERO" "$BG_RATE" \
    "$RTT" "$RATE" "${MODE#wan-emu: }" "$BUILDDIR" "$(( $(now) - T_START ))" "$failed_any" "$asan_log_note" \
    > "$tmp/table.txt" <<'PY'
import sys, time
(path, seed, ncyc, cyc_s, size_mib, img_bytes, nonzero, bg_rate, rtt, rate, mode, builddir,
 total_s, failed, note) = sys.argv[1:]
FIELDS = ("cyc", "kind", "dur", "link", "fetched", "seeded", "stale", "zs", "refetch", "errs",
          "reconn", "restarts", "reqs", "acked", "rd", "v1", "v2", "plan", "verdict")
rows = [dict(zip(FIELDS, l.rstrip("\n").split("\t"))) for l in open(path) if l.strip()]
print("xnbd soak run, %s, seed %s, %s cycle(s) of %s s, total %s s, build %s"
      % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), seed, ncyc, cyc_s, total_s, builddir))
print("image %s MiB (gen-image.py, %d non-zero bytes); link %s %s (wan-emu %s); xnbd:// zstd;"
      " background copy capped at %s B/s (x2 after the restart)" % (size_mib, int(nonzero), rtt, rate, mode, bg_rate))
print("per cycle: writer + checked reader all along, cache-all, pause/resume, one link cut, one proxy"
      " restart (SIGKILL odd cycles, SIGTERM even), verify after it, completion, detach, final verify with the link down")
print("link MB = rx+tx of the dst veth; fetched/seeded/zero-skipped summed over both proxy processes; seed stale ="
      " seed jobs fetched instead because the seed no longer matched (fetches.seed_stale); refetch ="
      " blocks present before the restart but not after it (bits not yet persisted); reconnects = source connections lost or declared dead (stalled), from the logs")
print()
hdr = ("cyc", "restart", "dur s", "link MB", "fetched MB", "seeded MB", "seed stale", "zero MB",
       "refetch blk", "fetch errs", "reconn", "restarts", "writes", "acked", "result")
fmt = "%3s | %7s | %5s | %7s | %10s | %9s | %10s | %7s | %11s | %10s | %6s | %8s | %6s | %6s | %s"
print(fmt % hdr)
mb = lambda v: "%.1f" % (int(v) / 1e6)
for r in rows:
    print(fmt % (r["cyc"], "SIG" + r["kind"], r["dur"], mb(r["link"]), mb(r["fetched"]),
                 mb(r["seeded"]), r["stale"], mb(r["zs"]), r["refetch"], r["errs"], r["reconn"],
                 r["restarts"], r["reqs"], r["acked"], r["verdict"]))
print()
for r in rows:
    print("cycle %s: plan %s" % (r["cyc"], r["plan"]))
    print("  reader: %s" % r["rd"])
    print("  verify after the restart: %s" % r["v1"])
    print("  final verify (detached, link down): %s" % r["v2"])
if note:
    print(note)
print()
bad = [r["cyc"] for r in rows if r["verdict"] != "OK"]
print("RESULT: %s" % ("all %d cycle(s) passed" % len(rows) if not bad and failed == "0" else
                      "FAILED (cycles: %s)" % (", ".join(bad) or "-")))
PY
tee "$OUT" < "$tmp/table.txt"
echo "soak: table saved to $OUT"
exit "$failed_any"
