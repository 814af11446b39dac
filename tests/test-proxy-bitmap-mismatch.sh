#!/usr/bin/env bash
# I5 right source: a bitmap (and cache) made for source A is refused, with
# exit status 1 and a message naming what differs and --clear-bitmap, when
# the proxy is started against a source of another size, another export of
# the same size, or with another --block-size.  A refused start leaves the
# bitmap untouched, and A still resumes from it.  With --clear-bitmap the
# same files start over and serve the new source correctly.
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img nbdinfo

M=$((1024 * 1024))
imgA=$TESTDIR/a.img imgB=$TESTDIR/b.img imgC=$TESTDIR/c.img
make_image "$imgA" 64M 1
make_image "$imgB" 32M 2
make_image "$imgC" 64M 3
ssock=$TESTDIR/src.sock psock=$TESTDIR/proxy.sock ctlsock=$TESTDIR/ctl
cache=$TESTDIR/cache.img bitmap=$TESTDIR/cache.bitmap
start_server xnbd-server -r -u "$ssock" -e a="$imgA" -e b="$imgB" -e c="$imgC"
uriA=$(nbd_unix_uri "$ssock" a) uriB=$(nbd_unix_uri "$ssock" b)
uriC=$(nbd_unix_uri "$ssock" c) uri=$(nbd_unix_uri "$psock")
common=(--cache "$cache" --bitmap "$bitmap" --control "$ctlsock" -u "$psock")

# A bitmap for A with some blocks present.
start_proxy --target "$uriA" "${common[@]}"
qio "$uri" "read 0 4M" "read $((40 * M)) 2M"
presentA=$(proxy_status "$ctlsock" blocks.present)
[ "$presentA" -ge $((6 * M / 4096)) ] || fail "only $presentA blocks present after reading 6 MiB"
stop_ok "$PROXY_PID" xnbd-proxy
bitmap_sha=$(sha "$bitmap") cache_sha=$(sha "$cache")

# refused WHAT REGEX... -- PROXY-ARGS...: the proxy must exit with status 1
# at start-up, its output must match every (case-insensitive, extended) REGEX,
# and the bitmap and cache must be unchanged.  Problems are collected in
# $problems so one run reports every case.
problems=()
refused () {
  local what=$1; shift
  local -a pats=()
  while [ "$1" != -- ]; do pats+=("$1"); shift; done
  shift
  local st=0 err=$TESTDIR/refused.err p
  timeout 20 "$XNBD_BUILD/xnbd-proxy" "$@" </dev/null >"$err" 2>&1 || st=$?
  echo "--- $what: exit status $st; output:"; cat "$err"
  if [ "$st" -eq 124 ]; then
    problems+=("$what: the proxy started (still running after 20 s) instead of refusing")
  elif [ "$st" -ne 1 ]; then
    problems+=("$what: exit status $st, expected 1")
  fi
  for p in "${pats[@]}"; do
    grep -qiE -e "$p" "$err" || problems+=("$what: the message does not match /$p/")
  done
  [ "$(sha "$bitmap")" = "$bitmap_sha" ] || problems+=("$what: the refused start changed the bitmap")
  [ "$(sha "$cache")" = "$cache_sha" ] || problems+=("$what: the refused start changed the cache image")
}

# Another size: the message names both sizes and --clear-bitmap.
refused "source of another size" \
  '(67108864|64 ?M)' '(33554432|32 ?M)' '--clear-bitmap' -- \
  --target "$uriB" "${common[@]}"
# Another export of the same size: the identity differs.
refused "another export of the same size" \
  '(identity|export)' '--clear-bitmap' -- \
  --target "$uriC" "${common[@]}"
# Another block size.
refused "another block size" \
  'block size' '4096' '8192' '--clear-bitmap' -- \
  --target "$uriA" --block-size 8192 "${common[@]}"

if [ "${#problems[@]}" -gt 0 ]; then
  printf 'FAIL: %s\n' "${problems[@]}" >&2
  fail "${#problems[@]} problem(s) with refused start-ups"
fi

# The refusals destroyed nothing: A resumes with the same blocks present.
start_proxy --target "$uriA" "${common[@]}"
[ "$(proxy_status "$ctlsock" blocks.present)" -eq "$presentA" ] ||
  fail "after the refusals A resumed with $(proxy_status "$ctlsock" blocks.present) blocks present, expected $presentA"
qemu-img compare -f raw -F raw "$imgA" "$uri" || fail "A served wrongly after the refusals"
stop_ok "$PROXY_PID" xnbd-proxy

# --clear-bitmap with the same files: starts over and serves B.
start_proxy --target "$uriB" "${common[@]}" --clear-bitmap
size=$(nbdinfo --size "$uri")
[ "$size" -eq $((32 * M)) ] || fail "with --clear-bitmap the proxy serves $size bytes, expected $((32 * M))"
[ "$(proxy_status "$ctlsock" blocks.present)" -eq 0 ] ||
  fail "--clear-bitmap left $(proxy_status "$ctlsock" blocks.present) blocks present"
qemu-img compare -f raw -F raw "$imgB" "$uri" || fail "B served wrongly after --clear-bitmap"
ctl_ok "$ctlsock" cache-all
wait_state "$ctlsock" complete 60
qemu-img compare -f raw -F raw "$imgB" "$uri" || fail "B differs after the copy completed"
stop_ok "$PROXY_PID" xnbd-proxy
same_content "$cache" "$imgB"
echo OK
