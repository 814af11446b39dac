#!/usr/bin/env bash
# Invariant I1 with seeds: client writes racing seed installs.  A block
# installed from a seed (JOB_LOCAL: read from the seed, re-hashed, written
# to the cache, marked present) must never overwrite a client's write, and
# a partial write to a block that is still missing must merge with the
# block's real content, whether it comes from a seed or the source.
#
# Source (32 MiB): each MiB is 15 pieces of 64 KiB taken from a random
# 32 MiB seed at shuffled offsets and one 64 KiB piece of new data; in
# every fourth MiB one of the seed's pieces is written zeros instead (data
# to block status, zero by digest: zero jobs race the writes too).  The
# proxy starts with --cache-all --bg-rate 192K --max-fetch 64K: the copy
# fetches a new piece only as the rate allows, and installs the seeded run
# behind it from the seed, so installs go on for about ten seconds.
# Meanwhile rounds of 60 concurrent client writes (qemu-io aio_write, no
# two of a round overlapping: whole blocks, runs of blocks, pieces of one
# block, writes straddling blocks, write-zeroes) go to the proxy, half
# near the copy's frontier (blocks.present), half anywhere; each round is
# applied to a model image too.  Concurrency matters: a partial write to a
# missing block makes a seed job of up to 1 MiB, and the whole-block writes
# after it land inside that job while it is being read and verified (a
# store_blocks that wrote a seed job's blocks without skipping the ones
# present by then failed this test in each of two runs).  After completion the disk
# equals the model: every written byte reads as its last write, every
# other byte as the source.
#
# Environment: I1_SEED=N reproduces the write sequence (printed).
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img python3

M=$((1024 * 1024))
SIZE=$((32 * M))
rseed=${I1_SEED:-$(( $(date +%s%N) / 1000 % 1000000 ))}
echo "write seed $rseed (reproduce with I1_SEED=$rseed)"
seed=$TESTDIR/seed.img src=$TESTDIR/src.img model=$TESTDIR/model.img
head -c "$SIZE" /dev/urandom >"$seed"
python3 - "$seed" "$src" "$rseed" <<'EOF'
import os, random, sys
seed, src, rs = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = random.Random(rs)
P = 64 << 10
with open(seed, "rb") as f:
    s = f.read()
pieces = list(range(len(s) // P))
r.shuffle(pieces)
out = bytearray()
for mib in range(len(s) >> 20):
    new = r.randrange(16)
    for k in range(16):
        if k == new:
            out += os.urandom(P)
        elif mib % 4 == 0 and k == (new + 1) % 16:
            out += bytes(P)
        else:
            out += s[pieces[mib * 16 + k] * P:(pieces[mib * 16 + k] + 1) * P]
with open(src, "wb") as f:
    f.write(out)
EOF
cp "$src" "$model"
seed_sha=$(sha "$seed")

start_server xnbd-server -r -u "$TESTDIR/src.sock" "$src"
ctl=$TESTDIR/ctl
start_proxy --target "$(nbd_unix_uri "$TESTDIR/src.sock")" --cache "$TESTDIR/cache" \
  --bitmap "$TESTDIR/bm" --control "$ctl" -u "$TESTDIR/px.sock" --seed "$seed" \
  --cache-all --bg-rate 192K --max-fetch 64K
puri=$(nbd_unix_uri "$TESTDIR/px.sock")
wait_state "$ctl" proxying 30
[ "$(proxy_status "$ctl" dedup)" = true ] || fail "deduplication not in use"

gen_writes () {   # ROUND FRONTIER: one round of qemu-io write commands, one a line
  python3 - "$rseed" "$1" "$2" "$SIZE" <<'EOF'
import random, sys
rs, rnd, front, size = (int(a) for a in sys.argv[1:])
r = random.Random(rs * 1000 + rnd)
B = 4096
used = []
def free(o, n):   # no two writes of a round overlap: any order gives one result
    return all(o + n <= a or b <= o for a, b in used)
out = 0
while out < 60:
    if r.random() < 0.5:
        lo = max(0, front - (1 << 20))
        b = r.randrange(lo // B, min(size, front + (3 << 20)) // B)
    else:
        b = r.randrange(size // B)
    k = r.randrange(100)
    if k < 30:                                   # whole blocks
        o, n = b * B, min(r.randint(1, 4), size // B - b) * B
    elif k < 65:                                 # part of one block
        s = r.randrange(B - 1)
        o, n = b * B + s, r.randint(1, B - s - 1) if s else r.randint(1, B - 1)
    else:                                        # straddles 1-2 boundaries
        if b + 2 >= size // B:
            continue
        o = b * B + r.randrange(1, B)
        n = (b + 1 + r.randrange(2)) * B + r.randrange(1, B) - o
    if not free(o, n):
        continue
    used.append((o, o + n))
    if r.random() < 0.15:
        print("aio_write -q -z %d %d" % (o, n))
    else:
        print("aio_write -q -P 0x%02x %d %d" % (r.randrange(1, 256), o, n))
    out += 1
EOF
}

rounds=0 raced=0
for (( round = 1; round <= 40; round++ )); do
  s=$(ctl_ok "$ctl" status)
  [ "$(json_get "$s" state)" = complete ] && break
  front=$(( $(json_get "$s" blocks.present) * 4096 ))
  [ "$(json_get "$s" blocks.missing)" -gt 0 ] && raced=$((raced + 1))
  mapfile -t cmds < <(gen_writes "$round" "$front")
  [ "${#cmds[@]}" -eq 60 ] || fail "round $round: generated ${#cmds[@]} writes"
  qio "$puri" "${cmds[@]}" aio_flush
  qio "$model" "${cmds[@]}" aio_flush
  rounds=$round
done
s=$(ctl_ok "$ctl" status)
echo "after $rounds rounds of 60 writes ($raced started with blocks missing): $s"
[ "$raced" -ge 1 ] || fail "the copy completed before any write: nothing raced"
wait_state "$ctl" complete 60
s=$(ctl_ok "$ctl" status)
echo "complete: $s"
(( $(json_get "$s" bytes.seeded) > 0 )) || fail "no block was installed from the seed: $s"
[ "$(json_get "$s" fetches.errors)" -eq 0 ] || fail "fetch errors: $s"
qemu-img compare -f raw -F raw "$model" "$puri" ||
  fail "I1: the disk differs from the model (source + client writes; I1_SEED=$rseed)"
stop_ok "$PROXY_PID" xnbd-proxy
[ "$(sha "$seed")" = "$seed_sha" ] || fail "the seed was modified"
echo OK
