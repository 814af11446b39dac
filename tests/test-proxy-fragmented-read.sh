#!/usr/bin/env bash
# A large client read over a missing range broken into many runs (every
# other block already present) waits for one fetch per run -- here 72 --
# and returns the source's data.  (It failed with ENOMEM when a request
# needed more than 64 new fetches; found by the soak run.)
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img

src=$TESTDIR/src.img
head -c $((32 * 1024 * 1024)) /dev/urandom >"$src"
ssock=$TESTDIR/src.sock psock=$TESTDIR/proxy.sock
start_server xnbd-server -r -u "$ssock" "$src"
start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$TESTDIR/cache.img" \
  --bitmap "$TESTDIR/cache.bitmap" --control "$TESTDIR/ctl" -u "$psock"
uri=$(nbd_unix_uri "$psock")
reads=()
for (( b = 0; b <= 142; b += 2 )); do reads+=(-c "read $((b * 4096)) 4096"); done
qemu-io -f raw -r "${reads[@]}" "$uri" >/dev/null || fail "reading single blocks failed"
[ "$(proxy_status "$TESTDIR/ctl" blocks.present)" -eq 72 ] || fail "expected 72 blocks present"
qemu-img dd -f raw -O raw if="$uri" of="$TESTDIR/head.img" bs=1M count=1 ||
  fail "a 1 MiB read over 72 missing runs failed"
cmp "$TESTDIR/head.img" <(head -c $((1024 * 1024)) "$src") ||
  fail "the 1 MiB read differs from the source"
echo OK
