#!/usr/bin/env bash
# D2, local damage is detected: one byte of the bit array of a proxy's
# bitmap set to 0xff (the reliability issue's reproducer, after a partial
# cache-all and a clean stop) makes the next start refuse, with exit
# status 1 and a message naming the bitmap, the blocks, why (checksum), and
# what to do (restore, or --clear-bitmap, which loses local writes); the
# refused start changes neither bitmap nor cache.  With --clear-bitmap the
# proxy starts over and serves the source's data.
source "$(dirname "$0")/functions.sh"
requires qemu-img od dd

M=$((1024 * 1024)) bs=4096
src=$TESTDIR/src.img
make_image "$src" 128M 7
ssock=$TESTDIR/src.sock psock=$TESTDIR/proxy.sock ctlsock=$TESTDIR/ctl
cache=$TESTDIR/cache.img bitmap=$TESTDIR/cache.bitmap
start_server xnbd-server -r -u "$ssock" "$src"
args=(--target "$(nbd_unix_uri "$ssock")" --cache "$cache" --bitmap "$bitmap"
      --control "$ctlsock" -u "$psock")
uri=$(nbd_unix_uri "$psock")

# A partial cache-all (rate-capped, paused after 2 MiB), then a clean stop.
start_proxy "${args[@]}"
wait_state "$ctlsock" proxying 30
ctl_ok "$ctlsock" "rate 2M" >/dev/null
ctl_ok "$ctlsock" cache-all >/dev/null
wait_status "$ctlsock" 60 'j["blocks"]["present"] >= 512'
ctl_ok "$ctlsock" pause >/dev/null
present=$(proxy_status "$ctlsock" blocks.present)
total=$(proxy_status "$ctlsock" blocks.total)
[ "$present" -lt "$total" ] || fail "the copy was not partial: $present of $total blocks present"
stop_ok "$PROXY_PID" xnbd-proxy

# The reproducer from the issue.  (If the byte were 0xff already the dd
# would change nothing and the test would prove nothing.)
off=$((4096 + 3000))
old=$(od -An -tx1 -j "$off" -N1 "$bitmap" | tr -d ' ')
[ -n "$old" ] && [ "$old" != ff ] || fail "the bitmap byte at $off is '$old' before the flip; expected a byte other than ff"
printf '\xff' | dd of="$bitmap" bs=1 seek="$off" conv=notrunc status=none
bitmap_sha=$(sha "$bitmap") cache_sha=$(sha "$cache")

st=0 err=$TESTDIR/refused.err
timeout 20 "$XNBD_BUILD/xnbd-proxy" "${args[@]}" </dev/null >"$err" 2>&1 || st=$?
echo "--- refused start: exit status $st; output:"; cat "$err"
[ "$st" -ne 124 ] || fail "the proxy started on a damaged bitmap (still running after 20 s)"
[ "$st" -eq 1 ] || fail "the proxy exited with status $st on a damaged bitmap, expected 1"
for p in "$bitmap" 'damaged' 'blocks 0-31743' 'checksum' 'backup' \
         '--clear-bitmap' 'discards the writes'; do
  grep -qiF -e "$p" "$err" || fail "the message does not say \"$p\""
done
[ "$(sha "$bitmap")" = "$bitmap_sha" ] || fail "the refused start changed the bitmap (silent repair)"
[ "$(sha "$cache")" = "$cache_sha" ] || fail "the refused start changed the cache image"

# Starting over works and serves the source (every block fetched again).
start_proxy "${args[@]}" --clear-bitmap
wait_state "$ctlsock" proxying 30
[ "$(proxy_status "$ctlsock" blocks.present)" -eq 0 ] ||
  fail "--clear-bitmap left $(proxy_status "$ctlsock" blocks.present) blocks present"
qemu-img compare -f raw -F raw "$src" "$uri" || fail "the proxy's disk differs from the source after --clear-bitmap"
stop_ok "$PROXY_PID" xnbd-proxy
echo OK
