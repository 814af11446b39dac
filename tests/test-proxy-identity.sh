#!/usr/bin/env bash
# I5 right source, by a real source identity rather than "export and size":
# a proxy that cached part of image A (served by xnbd-server) and stopped
# cleanly is refused -- exit 1, a message saying what differs and naming
# --clear-bitmap, bitmap and cache untouched -- when restarted against
#   - image B of the same size ("different image"),
#   - A edited while its server was stopped ("generation changed"),
# and resumes against A unchanged, also after writes made THROUGH the
# server (a VM's own writes: the new data is fetched, the cache is kept).
# For a source without an image id (nbdkit file plugin) the proxy compares
# sampled blocks: another image, or A with block 0 edited, is refused.
# Also: a bitmap with a legacy identity (export and size only) is accepted;
# an empty bitmap of another source is started over silently; --source-id
# with the recorded identity lets an operator keep a cache on purpose.
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img nbdkit

M=$((1024 * 1024)) SIZE=$((16 * 1024 * 1024))
imgA=$TESTDIR/a.img imgB=$TESTDIR/b.img imgC=$TESTDIR/c.img imgD=$TESTDIR/d.img
make_image "$imgA" 16M 1
make_image "$imgB" 16M 2
make_image "$imgC" 16M 3
make_image "$imgD" 16M 4
ssock=$TESTDIR/src.sock psock=$TESTDIR/proxy.sock ctlsock=$TESTDIR/ctl
cache=$TESTDIR/cache.img bitmap=$TESTDIR/cache.bitmap
uri=$(nbd_unix_uri "$psock")
common=(--target "$(nbd_unix_uri "$ssock")" --cache "$cache" --bitmap "$bitmap"
        --control "$ctlsock" -u "$psock")

# serve_xnbd IMAGE [OPTS] / serve_nbdkit IMAGE: the source on $ssock.
serve_xnbd () { local i=$1; shift; start_server xnbd-server -u "$ssock" "$@" "$i"; SRC_PID=$SERVER_PID; }
# (nbdkit leaves its socket behind when it stops.)
serve_nbdkit () { rm -f "$ssock"; start_nbdkit -r -U "$ssock" file file="$1"; SRC_PID=$SERVER_PID; }
stop_source () { stop_ok "$SRC_PID" "the source server"; }
# edit IMAGE BLOCK: new random bytes in 4 KiB block BLOCK (no server runs).
edit () { dd if=/dev/urandom of="$1" bs=4096 seek="$2" count=1 conv=notrunc status=none; }

# refused WHAT REGEX... -- PROXY-ARGS...: exit status 1 at start-up, output
# matching every (case-insensitive, extended) REGEX, bitmap and cache
# unchanged.  Problems are collected so one run reports every case.
problems=()
refused () {
  local what=$1; shift
  local -a pats=()
  while [ "$1" != -- ]; do pats+=("$1"); shift; done
  shift
  local st=0 err=$TESTDIR/refused.err p bsha csha
  bsha=$(sha "$bitmap") csha=$(sha "$cache")
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
  [ "$(sha "$bitmap")" = "$bsha" ] || problems+=("$what: the refused start changed the bitmap")
  [ "$(sha "$cache")" = "$csha" ] || problems+=("$what: the refused start changed the cache image")
}
check_problems () {
  if [ "${#problems[@]}" -gt 0 ]; then
    printf 'FAIL: %s\n' "${problems[@]}" >&2
    fail "${#problems[@]} problem(s) with refused start-ups"
  fi
}
# resumes PRESENT [PROXY-ARGS]: the proxy starts, with PRESENT blocks
# present and nothing fetched yet.
resumes () {
  local want=$1 got; shift
  start_proxy "${common[@]}" "$@"
  wait_state "$ctlsock" proxying 30
  got=$(proxy_status "$ctlsock" blocks.present)
  [ "$got" -eq "$want" ] || fail "resumed with $got blocks present, expected $want"
  [ "$(proxy_status "$ctlsock" bytes.fetched)" -eq 0 ] || fail "fetched before any read"
}
# same_range IMAGE OFFSET LENGTH: the proxy serves IMAGE's bytes there
# (only a range: reading everything would complete the bitmap, and a
# complete bitmap never contacts the source again).
same_range () {
  qemu-img compare --image-opts \
    "driver=raw,offset=$2,size=$3,file.driver=nbd,file.path=$psock" \
    "driver=raw,offset=$2,size=$3,file.driver=file,file.filename=$1" >/dev/null ||
    fail "the proxy does not serve the bytes of $1 at [$2, $2 + $3)"
}

# ======== xnbd-server source: the image id ========
serve_xnbd "$imgA" -r
start_proxy "${common[@]}"
wait_state "$ctlsock" proxying 30
qio "$uri" "read 0 2M" "read $((9 * M)) 1M"
presentA=$(proxy_status "$ctlsock" blocks.present)
[ "$presentA" -ge $((3 * M / 4096)) ] || fail "only $presentA blocks present after reading 3 MiB"
recorded=$(proxy_status "$ctlsock" source_id)
echo "recorded identity: $recorded"
[[ "$recorded" == *" xnbd-id="*" gen=0" ]] ||
  fail "the identity recorded for an xnbd-server source is '$recorded' (no image id)"
stop_ok "$PROXY_PID" xnbd-proxy
stop_source

# Another image of the same size.
serve_xnbd "$imgB" -r
refused "image B of the same size" 'different image' '--clear-bitmap' -- "${common[@]}"
stop_source
check_problems

# A unchanged (server restarted): resumes.
serve_xnbd "$imgA" -r
resumes "$presentA"
same_range "$imgA" 0 $((2 * M))
same_range "$imgA" $((9 * M)) $M
[ "$(proxy_status "$ctlsock" bytes.fetched)" -eq 0 ] || fail "reading cached ranges fetched"
stop_ok "$PROXY_PID" xnbd-proxy
stop_source

# Writes through the server to a block the proxy does not have: same
# generation, so the proxy resumes and fetches the new data.
serve_xnbd "$imgA"
qio "$(nbd_unix_uri "$ssock")" "write -P 0x61 $((12 * M)) 64k"
stop_source
serve_xnbd "$imgA" -r
resumes "$presentA"
qio "$uri" "read -P 0x61 $((12 * M)) 64k"
same_range "$imgA" $((12 * M - 4096)) $((72 * 1024))
presentA=$(proxy_status "$ctlsock" blocks.present)
stop_ok "$PROXY_PID" xnbd-proxy
stop_source

# A edited while its server was stopped, in a block the proxy does not
# have and no sample would hit: the generation tells.
edit "$imgA" $((5 * 256 + 7))
serve_xnbd "$imgA" -r
refused "image A edited behind the server" 'generation changed' 'behind the server' \
  '--clear-bitmap' -- "${common[@]}"
check_problems
# The operator may keep the cache on purpose with the recorded identity.
start_proxy "${common[@]}" --source-id "$recorded"
wait_state "$ctlsock" proxying 30
[ "$(proxy_status "$ctlsock" blocks.present)" -eq "$presentA" ] || fail "--source-id RECORDED did not keep the cache"
stop_ok "$PROXY_PID" xnbd-proxy
# --clear-bitmap starts over and serves the edited image.
start_proxy "${common[@]}" --clear-bitmap
[ "$(proxy_status "$ctlsock" blocks.present)" -eq 0 ] || fail "--clear-bitmap kept blocks"
qemu-img compare -f raw -F raw "$imgA" "$uri" || fail "after --clear-bitmap the edited A is served wrongly"
stop_ok "$PROXY_PID" xnbd-proxy
stop_source

# An EMPTY bitmap of another source is started over silently.
rm -f "$bitmap" "$cache"
serve_xnbd "$imgB" -r
start_proxy "${common[@]}"
wait_state "$ctlsock" proxying 30
stop_ok "$PROXY_PID" xnbd-proxy
stop_source
serve_xnbd "$imgA" -r
start_proxy "${common[@]}"
wait_state "$ctlsock" proxying 30
qemu-img compare -f raw -F raw "$imgA" "$uri" || fail "an empty bitmap of B, started over against A, serves wrongly"
[[ "$(proxy_status "$ctlsock" source_id)" == *"xnbd-id="* ]] || fail "the empty bitmap did not take A's identity"
stop_ok "$PROXY_PID" xnbd-proxy
stop_source

# A legacy identity (export and size only, as older proxies recorded) is
# accepted with a warning.
rm -f "$bitmap" "$cache"
serve_xnbd "$imgA" -r
start_proxy "${common[@]}" --source-id "export= size=$SIZE"
qio "$uri" "read 0 1M"
presentL=$(proxy_status "$ctlsock" blocks.present)
stop_ok "$PROXY_PID" xnbd-proxy
resumes "$presentL"
same_range "$imgA" 0 $M
grep -qiE 'older xnbd-proxy|cannot be checked' "$PROXY_LOG" ||
  fail "a legacy identity was accepted without a warning"
stop_ok "$PROXY_PID" xnbd-proxy
stop_source

# ======== nbdkit source: sampled blocks ========
rm -f "$bitmap" "$cache"
serve_nbdkit "$imgC"
start_proxy "${common[@]}"
wait_state "$ctlsock" proxying 30
qio "$uri" "read $((3 * M)) 2M"
presentC=$(proxy_status "$ctlsock" blocks.present)
[[ "$(proxy_status "$ctlsock" source_id)" == *" sample="* ]] ||
  fail "the identity recorded for nbdkit is '$(proxy_status "$ctlsock" source_id)' (no sample)"
stop_ok "$PROXY_PID" xnbd-proxy
stop_source

serve_nbdkit "$imgC"
resumes "$presentC"
same_range "$imgC" $((3 * M)) $((2 * M))
stop_ok "$PROXY_PID" xnbd-proxy
stop_source

serve_nbdkit "$imgD"
refused "nbdkit: image D of the same size" 'sampled blocks differ' '--clear-bitmap' -- "${common[@]}"
stop_source
edit "$imgC" 0
serve_nbdkit "$imgC"
refused "nbdkit: block 0 of C edited" 'sampled blocks differ' '--clear-bitmap' -- "${common[@]}"
stop_source
check_problems
echo OK
