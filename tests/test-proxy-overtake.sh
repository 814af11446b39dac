#!/usr/bin/env bash
# An on-demand read does not queue behind background data (DESIGN: strict
# priority for misses).  A client read of a block that a background job
# is already fetching, deep in the background window, gets its own fetch
# on the on-demand connection instead of waiting for that job.
#
# The source is nbdkit with a per-connection rate limit of 256 KiB/s
# (lifted for the end of the copy), the
# proxy copies with --connections 2 (connection 0 kept for on-demand
# fetches), 64 KiB jobs and a fixed 1 MiB window: in steady state a
# background job takes ~4 s from submission to completion.  Once the copy
# is in steady state the test reads block T = the last block of a job
# three quarters into the window (16 blocks per job; the copy is
# ascending and starts at block 0, so jobs are 16-block aligned).  Then:
#   - the read returns the source's data, and the proxy counted exactly
#     one on-demand fetch;
#   - in the cache image, block T holds the source's data while block T-1
#     (same background job) is still a hole: block T arrived without
#     waiting for its background job (that job writes both at once).
# After the copy completes, the export equals the source.
source "$(dirname "$0")/functions.sh"
requires qemu-io nbdkit nbdcopy cmp dd

nbdkit --filter=rate file --dump-plugin >/dev/null 2>&1 ||
  fail "nbdkit's rate filter is missing (package nbdkit)"
# shellcheck disable=SC2034  # read by wait_for in functions.sh
WAIT_TRIES=300

BS=4096 JOB=16
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
[ "$inflight" -ge $((4 * JOB)) ] || fail "only $inflight blocks in flight with a 1 MiB window"
[ "$(json_get "$s" fetches.ondemand)" -eq 0 ] || fail "on-demand fetches before any client read: $s"
T=$(( (present + inflight * 3 / 4) / JOB * JOB + JOB - 1 ))
echo "reading block $T"

# block_of FILE BLOCK: the block's bytes as hex.
block_of () { dd if="$1" bs=$BS skip="$2" count=1 status=none | od -An -v -tx1 | tr -d ' \n'; }
zero_block=$(head -c $BS /dev/zero | od -An -v -tx1 | tr -d ' \n')

qio "$(nbd_unix_uri "$psock")" "read -v $((T * BS)) $BS"
got_t=$(block_of "$cache" "$T") got_prev=$(block_of "$cache" $((T - 1)))
s=$(ctl_ok "$ctl" status)
echo "after the read: $s"
[ "$got_t" = "$(block_of "$src" "$T")" ] || fail "block $T in the cache is not the source's data"
[ "$got_prev" = "$zero_block" ] ||
  fail "block $((T - 1)) was already written: the read waited for the background job instead of overtaking it"
[ "$(json_get "$s" fetches.ondemand)" -eq 1 ] ||
  fail "fetches.ondemand is $(json_get "$s" fetches.ondemand), expected 1"

echo 1G > "$TESTDIR/rate"        # the rest at full speed (nbdkit rereads it)
wait_state "$ctl" complete 120
nbdcopy "$(nbd_unix_uri "$psock")" "$TESTDIR/out.img"
same_content "$TESTDIR/out.img" "$src"
st=0; stop_server "$PROXY_PID" || st=$?
[ "$st" -eq 0 ] || fail "xnbd-proxy exited with status $st on SIGTERM"
same_content "$cache" "$src"
echo OK
