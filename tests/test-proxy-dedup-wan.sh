#!/usr/bin/env bash
# Deduplication over xnbd:// (wan.h, nego.h: the early read): the first
# chunk of digests (512 KiB, 16384 blocks) is read along with the digest
# export's handshake, so it is in a round trip before the copy could ask
# it; the copy uses it like digests it asked.
#   run 1: an 80 MiB source (8 MiB of the seed, 4 MiB new, holes): the
#          log says the first digests came with the handshake; the disk
#          equals the source, 8 MiB came from the seed, 4 MiB were fetched.
#          (Each run also checks status completed_at, and xnbd-ctl's
#          human-readable line for it.)
#   run 2: XNBD_WAN_PIPELINE=0 (no handshake sent ahead): no early read;
#          the same result.
#   run 3: a 16 MiB source (a digest export of 128 KiB, shorter than the
#          read sent with the handshake): the server refuses that read, the
#          digests are asked as usual, the result is the same.
source "$(dirname "$0")/functions.sh"
requires qemu-img

M=$((1024 * 1024))
seed=$TESTDIR/seed.img
head -c $((8 * M)) /dev/urandom >"$seed"
seed_sha=$(sha "$seed")

# make_source FILE MIB: the seed at 1 MiB, 4 MiB of new data at MIB - 6.
make_source () {
  truncate -s $(($2 * M)) "$1"
  dd if="$seed" of="$1" bs=1M seek=1 conv=notrunc status=none
  head -c $((4 * M)) /dev/urandom | dd of="$1" bs=1M seek=$(($2 - 6)) conv=notrunc status=none
}

# serve FILE: an xnbd-server with a WAN port for FILE; sets WAN_PORT.
serve () {
  rm -f "$TESTDIR/wan.port"
  start_server xnbd-server -r -W 127.0.0.1:0 --wan-port-file "$TESTDIR/wan.port" "$1"
  wait_for test -s "$TESTDIR/wan.port" || fail "xnbd-server wrote no WAN port"
  WAN_PORT=$(cat "$TESTDIR/wan.port")
}

# migrate NAME SOURCE: proxy --cache-all --seed over xnbd://, to completion;
# checks the disk and the byte counts; prints the status.
migrate () {
  local n=$1 src=$2
  start_proxy -v --target "xnbd://127.0.0.1:$WAN_PORT/" --cache "$TESTDIR/$n.cache" \
    --bitmap "$TESTDIR/$n.bitmap" --control "$TESTDIR/$n.ctl" -u "$TESTDIR/$n.sock" \
    --seed "$seed" --index "$TESTDIR/$n.index" --cache-all
  wait_state "$TESTDIR/$n.ctl" complete 60
  qemu-img compare -q -f raw -F raw "$src" "$(nbd_unix_uri "$TESTDIR/$n.sock")" ||
    fail "$n: the proxy's disk differs from the source"
  local s
  s=$(ctl_ok "$TESTDIR/$n.ctl" status)
  # completed_at: when every block became present, as the status shows it.
  local at human
  at=$(json_get "$s" completed_at)
  # (json_get prints the number as a float: trailing zeros dropped)
  [[ $at =~ ^[0-9]{10}(\.[0-9]{1,6})?$ ]] || fail "$n: completed_at '$at' is not seconds since the epoch"
  human=$("$XNBD_BUILD/xnbd-ctl" --control "$TESTDIR/$n.ctl" status) || fail "$n: xnbd-ctl status failed"
  grep -q "^completed: *$(date -u -d "@${at%.*}" '+%Y-%m-%d %H:%M:%S')\.[0-9]\{3\} UTC$" <<<"$human" ||
    fail "$n: xnbd-ctl status does not show completed_at $at: $human"
  [ "$(json_get "$s" bytes.seeded)" -eq $((8 * M)) ] || fail "$n: bytes.seeded is not 8 MiB: $s"
  [ "$(json_get "$s" bytes.fetched)" -eq $((4 * M)) ] || fail "$n: bytes.fetched is not 4 MiB: $s"
  stop_ok "$PROXY_PID" xnbd-proxy
  echo "$n: $s"
}

early_line="came with the digest export's handshake"

# Run 1.
src=$TESTDIR/src.img
make_source "$src" 80
serve "$src"
migrate r1 "$src"
grep -q "$early_line" "$PROXY_LOG" ||
  fail "run 1: the first digests did not come with the handshake: $(grep -i digest "$PROXY_LOG")"

# Run 2.
START_ENV="XNBD_WAN_PIPELINE=0" migrate r2 "$src"
if grep -q "$early_line" "$PROXY_LOG"; then fail "run 2: an early read without the pipelined handshake"; fi
stop_ok "$SERVER_PID" xnbd-server

# Run 3.
small=$TESTDIR/small.img
make_source "$small" 16
serve "$small"
migrate r3 "$small"
if grep -q "$early_line" "$PROXY_LOG"; then fail "run 3: 512 KiB of digests from a 128 KiB export"; fi
stop_ok "$SERVER_PID" xnbd-server

[ "$(sha "$seed")" = "$seed_sha" ] || fail "the seed was modified"
echo "ok"
