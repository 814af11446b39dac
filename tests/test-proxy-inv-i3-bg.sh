#!/usr/bin/env bash
# I3 with the background copy running: a client read of a block that a
# background job is already fetching shares that fetch -- no block crosses
# the link twice -- and still gets the source's data.
#
# The source is nbdkit with a per-connection rate limit of 256 KiB/s
# (lifted for the end of the copy); the proxy copies with --connections 2
# (connection 0 kept for on-demand fetches), 64 KiB jobs and a fixed 1 MiB
# window, so a background job spends seconds in flight.  Once the copy is
# in steady state the test reads block T, three quarters into the window
# (the copy is ascending from block 0 over random data: every block from
# blocks.present to blocks.present + blocks.inflight is in flight).  Then:
#   - the read returns the source's data;
#   - the proxy made no on-demand fetch (the read joined the job, and
#     fetches.joined counts it);
#   - once complete, bytes.fetched is exactly the image size: every block
#     crossed once;
#   - the export and the cache image equal the source.
source "$(dirname "$0")/functions.sh"
requires qemu-io nbdkit nbdcopy cmp dd

nbdkit --filter=rate file --dump-plugin >/dev/null 2>&1 ||
  fail "nbdkit's rate filter is missing (package nbdkit)"
# shellcheck disable=SC2034  # read by wait_for in functions.sh
WAIT_TRIES=300

BS=4096
src=$TESTDIR/src.img cache=$TESTDIR/cache.img ctl=$TESTDIR/ctl psock=$TESTDIR/proxy.sock
head -c $((4 * 1024 * 1024)) /dev/urandom > "$src"
echo 2M > "$TESTDIR/rate"

start_nbdkit -U "$TESTDIR/src.sock" --filter=rate file "$src" \
  connection-rate-file="$TESTDIR/rate" burstiness=0.1
start_proxy --target "$(nbd_unix_uri "$TESTDIR/src.sock")" --cache "$cache" \
  --bitmap "$TESTDIR/cache.bm" --control "$ctl" -u "$psock" \
  --connections 2 --max-fetch 64K --bg-window 1M --cache-all
# Steady state: the first window (submitted at once) has been replaced.
wait_status "$ctl" 60 "j['bytes']['fetched'] >= 1536 * 1024"
s=$(ctl_ok "$ctl" status)
present=$(json_get "$s" blocks.present) inflight=$(json_get "$s" blocks.inflight)
echo "before the read: present $present, in flight $inflight blocks"
[ "$inflight" -ge 64 ] || fail "only $inflight blocks in flight with a 1 MiB window"
[ "$(json_get "$s" fetches.ondemand)" -eq 0 ] || fail "on-demand fetches before any client read: $s"
T=$(( present + inflight * 3 / 4 ))
echo "reading block $T"

QIO_TIMEOUT=120 qio "$(nbd_unix_uri "$psock")" "read -v $((T * BS)) $BS"
printf '%s\n' "$QIO_OUT" | sed -n 's/^[0-9a-f]*:  //p' | cut -c1-47 | tr -d ' \n' > "$TESTDIR/got.hex"
dd if="$src" bs=$BS skip="$T" count=1 status=none | od -An -v -tx1 | tr -d ' \n' > "$TESTDIR/want.hex"
cmp -s "$TESTDIR/got.hex" "$TESTDIR/want.hex" || fail "the read of block $T did not return the source's data"
s=$(ctl_ok "$ctl" status)
echo "after the read: $s"
[ "$(json_get "$s" fetches.ondemand)" -eq 0 ] ||
  fail "the read of in-flight block $T made $(json_get "$s" fetches.ondemand) on-demand fetch(es) instead of sharing the background job's (I3)"
[ "$(json_get "$s" fetches.joined)" -ge 1 ] ||
  fail "the read of in-flight block $T is not counted in fetches.joined: $s"

echo 1G > "$TESTDIR/rate"        # the rest at full speed (nbdkit rereads it)
wait_state "$ctl" complete 120
s=$(ctl_ok "$ctl" status)
[ "$(json_get "$s" bytes.fetched)" -eq $((4 * 1024 * 1024)) ] ||
  fail "bytes.fetched is $(json_get "$s" bytes.fetched) for a 4 MiB image: some block crossed twice (I3)"
[ "$(json_get "$s" fetches.ondemand)" -eq 0 ] || fail "on-demand fetches during the copy: $s"
nbdcopy "$(nbd_unix_uri "$psock")" "$TESTDIR/out.img"
same_content "$TESTDIR/out.img" "$src"
stop_ok "$PROXY_PID" xnbd-proxy
same_content "$cache" "$src"
echo OK
