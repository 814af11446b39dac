#!/usr/bin/env bash
# D4: completion is noticed when the last missing blocks resolve as zeros
# (block status), not only when a fetch lands.  A source that is one big
# hole, and one with a little data at the start and a long hole after it:
# --cache-all --detach-when-complete must reach "detached" and
# `xnbd-ctl cache-all --wait` must return; the disk equals the source.
source "$(dirname "$0")/functions.sh"
requires qemu-img

M=$((1024 * 1024))
for kind in empty data-then-hole; do
  src=$TESTDIR/$kind.img
  make_sparse_image "$src" 256M
  if [ "$kind" = data-then-hole ]; then
    make_image "$TESTDIR/data.img" 4M 7
    dd if="$TESTDIR/data.img" of="$src" conv=notrunc status=none
  fi
  ssock=$TESTDIR/$kind.src.sock psock=$TESTDIR/$kind.proxy.sock ctlsock=$TESTDIR/$kind.ctl
  start_server xnbd-server -r -u "$ssock" "$src"
  src_pid=$SERVER_PID
  start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$TESTDIR/$kind.cache" \
    --bitmap "$TESTDIR/$kind.bitmap" --control "$ctlsock" -u "$psock" \
    --cache-all --detach-when-complete
  # cache-all --wait returns once every block is present (bounded by timeout).
  timeout 60 "$XNBD_BUILD/xnbd-ctl" --control "$ctlsock" cache-all --wait ||
    fail "$kind: cache-all --wait did not return success"
  wait_state "$ctlsock" detached 30
  s=$(ctl_ok "$ctlsock" status)
  [ "$(json_get "$s" blocks.missing)" -eq 0 ] || fail "$kind: blocks missing after detach: $s"
  qemu-img compare -f raw -F raw "$src" "$(nbd_unix_uri "$psock")" ||
    fail "$kind: the proxy's disk differs from the source"
  stop_ok "$PROXY_PID" xnbd-proxy
  stop_ok "$src_pid" xnbd-server
done
echo OK
