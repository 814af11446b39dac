#!/usr/bin/env bash
# A source that, while it is out, accepts connections and hangs up at once
# (a relay or load balancer whose back end is gone; here
# tests/tools/cut-relay.py, cut): the proxy's reconnect attempts meet a
# connection closed during the handshake.  Once the source is back, the
# proxy must reconnect and the copy complete, with the right data.
# (test-proxy-source-loss covers a source whose socket refuses connections.)
source "$(dirname "$0")/functions.sh"
requires cmp python3

src=$TESTDIR/src.img
make_image "$src" 32M 21
ssock=$TESTDIR/src.sock lsock=$TESTDIR/link.sock ctlsock=$TESTDIR/ctl

start_server xnbd-server -r -u "$ssock" "$src"
# 8 MiB/s from the source: the copy takes seconds, the outage falls in it.
python3 "$XNBD_SRC/tests/tools/cut-relay.py" "$lsock" "$ssock" "$TESTDIR/link.ready" $((8 * 1024 * 1024)) \
  2>"$TESTDIR/relay.server.log" &
relay=$!
cleanup_fn kill "$relay"
wait_for test -s "$TESTDIR/link.ready"

start_proxy --target "$(nbd_unix_uri "$lsock")" --cache "$TESTDIR/cache.img" \
  --bitmap "$TESTDIR/cache.bitmap" --control "$ctlsock" -u "$TESTDIR/proxy.sock" \
  --cache-all --source-timeout 120
wait_status "$ctlsock" 30 'j["bytes"]["fetched"] > 0'
kill -USR1 "$relay"
wait_status "$ctlsock" 10 'j["connections"]["up"] == 0'
[ "$(proxy_status "$ctlsock" blocks.missing)" -gt 0 ] || fail "the copy was complete before the outage"
# At least three reconnect attempts meet the hang-up before the source is
# back (backoff from 0.1 s: within a few seconds).
for (( i = 0; i < 100; i++ )); do
  [ "$(grep -c 'connection refused' "$TESTDIR/relay.server.log")" -ge 3 ] && break
  sleep 0.1
done
[ "$(grep -c 'connection refused' "$TESTDIR/relay.server.log")" -ge 3 ] ||
  fail "the proxy made fewer than 3 reconnect attempts in 10 s of outage"
kill -USR2 "$relay"
# Backoff is at most 5 s: the proxy is back well within 30 s.
wait_status "$ctlsock" 30 'j["connections"]["up"] > 0'
wait_status "$ctlsock" 60 'j["blocks"]["missing"] == 0'
ctl_ok "$ctlsock" flush
cmp "$src" "$TESTDIR/cache.img" || fail "the cache differs from the source after the outage"
echo OK
