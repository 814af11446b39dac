#!/usr/bin/env bash
# Pre-paging: while the background copy runs, a client miss makes the copy
# take the 1 MiB after the missed block next, before its ascending sweep
# goes on (a guest that touched a page touches its neighbours soon).  The
# copy is slow (--bg-rate 2M from offset 0), the miss is at 40 MiB; once
# status counts the pre-paged fetch, the source is stopped: the 1 MiB after
# the miss reads right from the cache alone, while a block far from both
# the miss and the sweep fails with EIO (it was never fetched).
source "$(dirname "$0")/functions.sh"
requires qemu-io cmp

M=$((1024 * 1024))
src=$TESTDIR/src.img
head -c $((64 * M)) /dev/urandom >"$src"       # data everywhere: no zero skipped
ssock=$TESTDIR/src.sock psock=$TESTDIR/proxy.sock ctlsock=$TESTDIR/ctl
uri=$(nbd_unix_uri "$psock")
start_server xnbd-server -r -u "$ssock" "$src"
src_pid=$SERVER_PID
start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$TESTDIR/cache.img" \
  --bitmap "$TESTDIR/cache.bitmap" --control "$ctlsock" -u "$psock" \
  --bg-rate 2M --bg-window 16M --source-timeout 2
wait_state "$ctlsock" proxying 30
ctl_ok "$ctlsock" cache-all >/dev/null
[ "$(proxy_status "$ctlsock" fetches.prepaged)" -eq 0 ] || fail "pre-paged before any miss"

# The miss: one block at 40 MiB.
qio "$uri" "read $((40 * M)) 4096" >/dev/null
wait_status "$ctlsock" 30 'j["fetches"]["prepaged"] >= 1'
status=$(ctl_ok "$ctlsock" status)
echo "after the miss: $status"
present=$(json_get "$status" blocks.present)
[ "$present" -lt $((32 * M / 4096)) ] || fail "the sweep copied $present blocks already: too fast to tell"

stop_ok "$src_pid" xnbd-server
# The MiB after the miss is here: it reads right without the source.
dd if="$src" of="$TESTDIR/want.bin" bs=4096 skip=$(((40 * M + 4096) / 4096)) count=256 status=none
# (qemu-img dd counts skipped blocks in count)
timeout 30 qemu-img dd -f raw -O raw if="$uri" of="$TESTDIR/got.bin" bs=4096 \
  skip=$(((40 * M + 4096) / 4096)) count=$(((40 * M + 4096) / 4096 + 256)) >"$TESTDIR/dd.out" 2>&1 ||
  { cat "$TESTDIR/dd.out"; fail "reading the MiB after the miss failed without the source: not pre-paged"; }
cmp "$TESTDIR/got.bin" "$TESTDIR/want.bin" || fail "the pre-paged MiB differs from the source"
# Far from the miss and from the sweep: never fetched, so EIO now.
out2=$(timeout 30 qemu-io -f raw -c "read $((60 * M)) 4096" "$uri" 2>&1) || true
grep -qi 'Input/output error' <<<"$out2" || fail "a block never fetched read without the source: $out2"
assert_alive "$PROXY_PID"
echo OK
