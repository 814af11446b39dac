#!/usr/bin/env bash
# D7: the cache disk fills up during cache-all.  The background copy must
# stop (paused, the cause in status.last_error) instead of re-fetching the
# same blocks forever; nothing is marked present without its data; after
# space is freed, `xnbd-ctl resume` finishes the copy and the disk equals
# the source.  (Before the fix the proxy re-fetched at link rate forever
# with "last error: none".)  The cache lives on a 64 MiB tmpfs mounted for
# this test; the source has 160 MiB of incompressible data.
source "$(dirname "$0")/functions.sh"
requires qemu-img mount umount

M=$((1024 * 1024)) size=$((160 * 1024 * 1024))
src=$TESTDIR/src.img small=$TESTDIR/small
head -c "$size" /dev/urandom >"$src"
mkdir "$small"
mount -t tmpfs -o size=64m xnbd-test-full "$small" ||
  skip "cannot mount a tmpfs here (not root, or no mount namespace rights)"
cleanup_fn umount -l "$small"

ssock=$TESTDIR/src.sock psock=$TESTDIR/proxy.sock ctlsock=$TESTDIR/ctl
start_server xnbd-server -r -u "$ssock" "$src"
start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$small/cache.img" \
  --bitmap "$small/cache.bitmap" --control "$ctlsock" -u "$psock"
wait_state "$ctlsock" proxying 30
ctl_ok "$ctlsock" cache-all >/dev/null
# The copy stops by itself: paused, the reason given, nothing in flight.
wait_status "$ctlsock" 60 'j["background"]["paused"] and j["blocks"]["inflight"] == 0'
s=$(ctl_ok "$ctlsock" status)
echo "after the disk filled: $s"
err=$(json_get "$s" last_error)
case $err in
  *"No space left"*cache*|*cache*"No space left"*) ;;
  *) fail "last_error does not name the full cache disk: '$err'" ;;
esac
fetched=$(json_get "$s" bytes.fetched)
# Everything fetched landed once or failed once: never more than the image.
[ "$fetched" -le "$size" ] || fail "fetched $fetched bytes of a $size-byte image: re-fetching"
present=$(json_get "$s" blocks.present)
[ "$present" -lt $((size / 4096)) ] || fail "every block present on a 64 MiB disk?"
# The copy runs in ascending order: the first 8 MiB are present and must
# read back as the source (bit implies data, I2).
[ "$present" -ge 2048 ] || fail "only $present blocks present before the disk filled"
qemu-img dd -f raw -O raw if="$(nbd_unix_uri "$psock")" of="$TESTDIR/head.img" bs=1M count=8
cmp "$TESTDIR/head.img" <(head -c $((8 * M)) "$src") ||
  fail "blocks present before the disk filled do not read as the source"

# Free space and resume: the copy completes and the disk equals the source.
mount -o remount,size=512m "$small"
ctl_ok "$ctlsock" resume >/dev/null
wait_state "$ctlsock" complete 120
qemu-img compare -f raw -F raw "$src" "$(nbd_unix_uri "$psock")" ||
  fail "the proxy's disk differs from the source after resume"
s=$(ctl_ok "$ctlsock" status)
[ -z "$(json_get "$s" last_error)" ] || fail "last_error not cleared by resume: $s"
stop_ok "$PROXY_PID" xnbd-proxy
same_content "$small/cache.img" "$src"
echo OK
