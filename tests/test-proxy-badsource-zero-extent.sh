#!/usr/bin/env bash
# D6: a block-status reply whose extent has length 0 is rejected, not asked
# again for ever.  tests/tools/bad-source.py (bs-zero-length) answers every
# block-status request with one extent of length 0; its reads are right.
# `xnbd-ctl cache-all --wait` must return (the copy goes on, that range
# copied without zero-skipping), the disk must equal the source, the proxy's
# last_error must say what the source did, and the number of block-status
# requests the source saw must stay small (a handful per range asked; the
# livelock sends them by the million).
#
# Fails before the D6 fix because the proxy asks for the same range's block
# status again as soon as each zero-length reply completes, copies nothing
# and logs nothing: cache-all --wait times out, last_error is empty and the
# source counts hundreds of thousands of block-status requests.
# (Expected to fail until the engine's D6 fix lands.)
source "$(dirname "$0")/functions.sh"
requires qemu-img python3

BAD=$XNBD_SRC/tests/tools/bad-source.py
src=$TESTDIR/src.img
make_image "$src" 64M 3
src_sha=$(sha "$src")
ssock=$TESTDIR/src.sock psock=$TESTDIR/proxy.sock ctlsock=$TESTDIR/ctl
counters=$TESTDIR/counters
start_server "$BAD" --unix "$ssock" --counters "$counters" --misbehave bs-zero-length "$src"
src_pid=$SERVER_PID
start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$TESTDIR/cache.img" \
  --bitmap "$TESTDIR/cache.bitmap" --control "$ctlsock" -u "$psock" --source-timeout 5
wait_state "$ctlsock" proxying 30

failures=()
st=0
timeout 60 "$XNBD_BUILD/xnbd-ctl" --control "$ctlsock" cache-all --wait || st=$?
[ "$st" -eq 0 ] || failures+=("cache-all --wait did not return success within 60 s (exit $st)")
s=$(ctl_ok "$ctlsock" status)
echo "after cache-all: $s"
err=$(json_get "$s" last_error)
grep -qiE 'block.status|extent' <<<"$err" ||
  failures+=("last_error does not report the bad block-status reply: '$err'")
if [ "$(json_get "$s" state)" = complete ]; then
  qemu-img compare -f raw -F raw "$src" "$(nbd_unix_uri "$psock")" ||
    failures+=("the proxy's disk differs from the source")
else
  failures+=("state is $(json_get "$s" state), not complete")
fi
stop_ok "$PROXY_PID" xnbd-proxy
stop_ok "$src_pid" bad-source        # its counters file is final now
c=$(cat "$counters")
echo "source counters: $c"
[ "$(json_get "$c" misbehaved)" -gt 0 ] ||
  fail "the source never sent a zero-length extent (the proxy asked no block status?): $c"
# One range of 64 MiB is asked; a few tries each is plenty.  Far more is the livelock.
bs=$(json_get "$c" requests.block_status)
[ "$bs" -le 100 ] || failures+=("the source got $bs block-status requests for a 64 MiB export")
[ "$(sha "$src")" = "$src_sha" ] || fail "the source image changed (I6)"
[ "${#failures[@]}" -eq 0 ] || fail "$(printf '%s; ' "${failures[@]}")"
echo OK
