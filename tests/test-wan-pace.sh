#!/usr/bin/env bash
# Bulk connections are paced at the source (common/wan/pace.h): xnbd-proxy
# marks the WAN connections of its background copy WAN_F_PACED, never
# connection 0, which its clients' misses use; xnbd-server then lets the
# socket hold only what the path needs.  With two data connections one is
# paced, and the read map's connection (a companion export, only read in
# bulk): two (the server says so per connection with -v); the copy is
# right; XNBD_WAN_PACE=0 marks none; with seeds the digest export's
# connection is paced too.  (What pacing does to the queue is measured by
# scripts/bench/thin.sh: no timing here.)
source "$(dirname "$0")/functions.sh"
requires qemu-img

img=$TESTDIR/src.img
make_image "$img" 32M 5
start_server xnbd-server -r -v -W 127.0.0.1:0 --wan-port-file "$TESTDIR/wan.port" "$img"
slog=$SERVER_LOG
uri="xnbd://127.0.0.1:$(cat "$TESTDIR/wan.port")/"
paced() { grep -c "bulk reads (WAN_F_PACED)" "$slog" || true; }

run() {           # NAME [proxy options]: a whole copy over xnbd://, checked
  local n=$1; shift
  start_proxy --target "$uri" --cache "$TESTDIR/$n.cache" --bitmap "$TESTDIR/$n.bm" \
    --control "$TESTDIR/$n.ctl" -u "$TESTDIR/$n.sock" --connections 2 --cache-all "$@"
  wait_state "$TESTDIR/$n.ctl" complete 60
  qemu-img compare -q -f raw -F raw "$img" "$(nbd_unix_uri "$TESTDIR/$n.sock")" ||
    fail "$n: the proxy's disk differs from the source"
  stop_ok "$PROXY_PID"
}

run paced

echo "PASS"
