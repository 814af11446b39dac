#!/usr/bin/env bash
# A source that serves one client at a time (qemu-nbd's default, --shared=1)
# with the proxy's default two connections: the second connection waits in
# the server's listen queue and never finishes its handshake.  Background
# reads keep off connection 0 (reserved for client misses) only while
# another connection is on its way, for a bounded time: the copy must still
# complete over connection 0, a client read must still be served, and the
# cache must equal the source.
source "$(dirname "$0")/functions.sh"
requires qemu-nbd nbdcopy cmp

src=$TESTDIR/src.img ssock=$TESTDIR/src.sock psock=$TESTDIR/proxy.sock ctlsock=$TESTDIR/ctl
make_image "$src" 8M 3
start_qemu_nbd -f raw -r -k "$ssock" "$src"      # --shared=1: one client
start_proxy --target "$(nbd_unix_uri "$ssock")" --connections 2 --cache "$TESTDIR/cache.img" \
  --bitmap "$TESTDIR/cache.bitmap" --control "$ctlsock" -u "$psock" --cache-all \
  --source-timeout 600    # the waiting connection is not given up on in this test
wait_state "$ctlsock" complete 60
s=$(ctl_ok "$ctlsock" status)
[ "$(json_get "$s" connections.up)" = 1 ] ||
  fail "expected one source connection up (qemu-nbd serves one client): $s"
[ "$(json_get "$s" bytes.fetched)" -gt 0 ] || fail "nothing was fetched: $s"
nbdcopy "$(nbd_unix_uri "$psock")" "$TESTDIR/read.img" || fail "nbdcopy through the proxy failed"
cmp "$src" "$TESTDIR/read.img" || fail "a client read through the proxy differs from the source"
ctl_ok "$ctlsock" detach >/dev/null
cmp "$src" "$TESTDIR/cache.img" || fail "the cache differs from the source"
echo OK
