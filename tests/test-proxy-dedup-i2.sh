#!/usr/bin/env bash
# Invariant I2 with seeds: SIGKILL while blocks are being installed from a
# seed.  A block's bit may be on disk only once its data is (bit implies
# data), and flushed client writes survive; after restarts with the same
# files the migration completes with the source's data plus the writes.
#
# Source (128 MiB): each MiB is 15 pieces of 64 KiB from a random 128 MiB
# seed (shuffled) and one piece of new data.  --bg-rate 64K caps only what
# is fetched (the new pieces; --max-fetch 64K keeps its bucket small), so
# the background copy crawls (1 MiB/s at most: the 128 MiB take two
# minutes, twice what the four runs took under ASan on a busy machine,
# 56 s; with 64 MiB at 4 MiB/s, and then at 1 MiB/s, the copy completed
# before the last kill there, and a slower crawl leaves too few jobs in
# flight to catch in a fast build), installing seed jobs in
# bursts behind each fetched piece; --persist-interval 50 persists the
# bitmap often.  Each of 4 runs: a fresh proxy on the same cache and bitmap
# (--cache-all); a few client writes (whole blocks, parts of blocks,
# straddling) and a FLUSH, applied to a model too; then a client reads a
# 6 MiB range far ahead of the copy, whose misses are served from the seed
# (a seed job per MiB); as soon as status shows blocks in flight (polled
# with sockcmd, a condition, not a delay) the proxy gets SIGKILL.  (A
# store_blocks that persisted a seed job's bits before writing its data
# failed this test.)  A last
# proxy completes the copy; the disk must equal the model, and the seed and
# source be unchanged.
#
# Like test-proxy-crash-i2, SIGKILL keeps what the proxy handed to the
# kernel: this checks the order of things (data written before its bit is
# persisted, a flush reply after both), not fsync itself.
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img python3

M=$((1024 * 1024))
SIZE=$((128 * M))
rseed=${I2_SEED:-$(( $(date +%s%N) / 1000 % 1000000 ))}
echo "seed $rseed (reproduce with I2_SEED=$rseed)"
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
with open(src, "wb") as f:
    for mib in range(len(s) >> 20):
        new = r.randrange(16)
        for k in range(16):
            f.write(os.urandom(P) if k == new else s[pieces[mib * 16 + k] * P:(pieces[mib * 16 + k] + 1) * P])
EOF
cp "$src" "$model"
SOCKCMD=$XNBD_BUILD/tests/sockcmd
[ -x "$SOCKCMD" ] || fail "$SOCKCMD not built (run make)"
seed_sha=$(sha "$seed") src_sha=$(sha "$src")

start_server xnbd-server -r -u "$TESTDIR/src.sock" "$src"
src_pid=$SERVER_PID
ctl=$TESTDIR/ctl
puri=$(nbd_unix_uri "$TESTDIR/px.sock")
proxy_up () {
  start_proxy --target "$(nbd_unix_uri "$TESTDIR/src.sock")" --cache "$TESTDIR/cache" \
    --bitmap "$TESTDIR/bm" --control "$ctl" -u "$TESTDIR/px.sock" --seed "$seed" \
    --cache-all --bg-rate 64K --max-fetch 64K --persist-interval 50
  wait_state "$ctl" proxying 30
}
gen_writes () {   # RUN: a few writes (whole, partial, straddling) and a flush
  python3 - "$rseed" "$1" "$SIZE" <<'EOF'
import random, sys
rs, run, size = (int(a) for a in sys.argv[1:])
r = random.Random(rs * 100 + run)
B = 4096
for i in range(12):
    b = r.randrange(size // B - 2)
    k = i % 3
    if k == 0:
        o, n = b * B, r.randint(1, 2) * B
    elif k == 1:
        s = r.randrange(1, B - 1)
        o, n = b * B + s, r.randint(1, B - s - 1)
    else:
        o = b * B + r.randrange(1, B)
        n = (b + 1) * B + r.randrange(1, B) - o
    print("write -P 0x%02x %d %d" % (r.randrange(1, 256), o, n))
print("flush")
EOF
}

for (( run = 1; run <= 4; run++ )); do
  proxy_up
  present=$(proxy_status "$ctl" blocks.present)
  mapfile -t cmds < <(gen_writes "$run")
  qio "$puri" "${cmds[@]}"
  qio "$model" "${cmds[@]}"
  # A client reads a range still missing: seed jobs, the copy's and its own.
  roff=$(( SIZE - run * 6 * M ))
  timeout 60 qemu-io -f raw -r -c "read $roff 6M" "$puri" >"$TESTDIR/read.out" 2>&1 &
  reader=$!
  inflight=0 missing=0 rereads=0
  for (( i = 0; i < 3000; i++ )); do
    read -r inflight missing < <("$SOCKCMD" -t 10 "$ctl" status blocks.inflight blocks.missing) ||
      fail "run $run: no status"
    [ "$inflight" -gt 0 ] || [ "$missing" -eq 0 ] && break
    # A read served between two polls leaves nothing to catch: read the
    # next range (the copy itself crawls, rarely in flight at a poll).
    if ! kill -0 "$reader" 2>/dev/null && (( rereads < 5 )); then
      wait "$reader" || echo "run $run: reader: $(tr '\n' ' ' < "$TESTDIR/read.out")"
      # below every run's own range (the last 4 x 6 MiB), one set per run
      rereads=$((rereads + 1)) roff=$((SIZE - 24 * M - ((run - 1) * 5 + rereads) * 6 * M))
      timeout 60 qemu-io -f raw -r -c "read $roff 6M" "$puri" >"$TESTDIR/read.out" 2>&1 &
      reader=$!
    fi
  done
  [ "$missing" -gt 0 ] || fail "run $run: the copy completed before the kill"
  [ "$inflight" -gt 0 ] ||
    fail "run $run: no block was ever in flight (3000 polls, $rereads more reads; last read: $(tr '\n' ' ' < "$TESTDIR/read.out"))"
  (( rereads == 0 )) || echo "run $run: read $rereads more ranges before blocks were seen in flight"
  st=0; stop_server "$PROXY_PID" KILL 2>/dev/null || st=$?
  [ "$st" -eq 137 ] || fail "run $run: xnbd-proxy exit status $st after SIGKILL (expected 137)"
  wait "$reader" || true          # its read failed with the proxy; only timing out would hang
  echo "run $run: $present blocks present at start; killed with $inflight blocks in flight, $missing missing"
done

proxy_up
ctl_ok "$ctl" "rate 0" >/dev/null    # the last run need not crawl
wait_state "$ctl" complete 60
s=$(ctl_ok "$ctl" status)
echo "last run: $s"
qemu-img compare -f raw -F raw "$model" "$puri" ||
  fail "I2: after the crashes the disk differs from the model (source + flushed writes; I2_SEED=$rseed)"
stop_ok "$PROXY_PID" xnbd-proxy
assert_alive "$src_pid"
[ "$(sha "$seed")" = "$seed_sha" ] || fail "the seed was modified"
[ "$(sha "$src")" = "$src_sha" ] || fail "the source image changed"
echo OK
