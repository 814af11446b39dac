#!/usr/bin/env bash
# The WAN hello carries the NBD options (wan.h, WAN_F_EARLY): without TLS,
# xnbd-proxy sends its NBD options right after the hello, before the
# server has answered (one round trip less per connection), framed as it
# asked (zstd); XNBD_WAN_PIPELINE=0 and xnbds:// do not.  A server with
# --compress=off still reads those compressed options and answers
# uncompressed: the copy is right and the image's text crosses the link
# in the clear (server to proxy), while the proxy's direction is zstd.
source "$(dirname "$0")/functions.sh"
requires python3 qemu-img psktool

img=$TESTDIR/src.img
make_text_image "$img" EARLY-HELLO-MARKER 1024     # 4 MiB

stop_quiet() { kill "$1" 2>/dev/null || true; }   # for cleanup: may be gone

# hello_probe NAME [ENV...] -- SCHEME [PROXY OPTIONS...]: a listener that takes
# one connection, reads the 20-byte hello and, if it asks EARLY, without
# answering, the first bytes that follow (at most 10 s); writes "FLAGS
# EXTRA_BYTES FIRST4_HEX" to $TESTDIR/NAME.probe.  A hello without EARLY
# is answered by nothing and so gets nothing more (a client that sent its
# options anyway would break a server of the other framing): its flags
# are the check.
hello_probe() {
  local name=$1; shift
  local envs=()
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done
  shift
  local pf=$TESTDIR/$name.port out=$TESTDIR/$name.probe
  rm -f "$pf" "$out"
  python3 - "$pf" "$out" <<'PY' &
import os, socket, struct, sys, time
pf, out = sys.argv[1], sys.argv[2]
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
open(pf + ".tmp", "w").write("%d\n" % ls.getsockname()[1]); os.rename(pf + ".tmp", pf)
ls.settimeout(30)
c, _ = ls.accept()
c.settimeout(10)
h = b""
while len(h) < 20:
    d = c.recv(20 - len(h))
    if not d: break
    h += d
flags = struct.unpack(">I", h[12:16])[0] if len(h) == 20 and h[:8] == b"XNBDWAN\0" else -1
extra = b""
deadline = time.monotonic() + 10
while flags >= 0 and flags & 4 and len(extra) < 4 and time.monotonic() < deadline:
    try:
        d = c.recv(4096)
    except socket.timeout:
        break
    if not d: break
    extra += d
open(out + ".tmp", "w").write("%d %d %s\n" % (flags, len(extra), extra[:4].hex()))
os.rename(out + ".tmp", out)
PY
  local probe=$!
  cleanup_fn stop_quiet "$probe"
  wait_for test -s "$pf" || fail "$name: the probe listener did not start"
  local d=$TESTDIR/$name
  mkdir -p "$d"
  env "${envs[@]}" "$XNBD_BUILD/xnbd-proxy" --target "$1://127.0.0.1:$(cat "$pf")/" \
      --cache "$d/cache" --bitmap "$d/bm" -u "$d/px.sock" --control "$d/ctl" "${@:2}" \
      </dev/null >"$d/proxy.log" 2>&1 &
  local px=$!
  cleanup_fn stop_quiet "$px"
  wait_for test -s "$out" || fail "$name: the probe saw no hello"
  kill "$px" 2>/dev/null || true
  wait "$px" 2>/dev/null || true
  wait "$probe" 2>/dev/null || true
}

# 1. xnbd://: EARLY (4) with ZSTD (1); the options follow at once, a zstd frame.
hello_probe early -- xnbd
read -r flags extra first < "$TESTDIR/early.probe"
echo "xnbd://: hello flags $flags, $extra bytes before any answer, starting $first"
(( flags >= 0 && (flags & 4) && (flags & 1) )) || fail "xnbd://: hello flags $flags lack EARLY and ZSTD"
(( extra > 0 )) || fail "xnbd://: no NBD options arrived before the server answered"
[[ $first == 28b52ffd ]] || fail "xnbd://: early bytes start $first, not a zstd frame"

# 2. XNBD_WAN_PIPELINE=0: no options sent ahead, so no EARLY.
hello_probe nopipe XNBD_WAN_PIPELINE=0 -- xnbd
read -r flags extra first < "$TESTDIR/nopipe.probe"
echo "XNBD_WAN_PIPELINE=0: hello flags $flags"
(( flags >= 0 && !(flags & 4) )) || fail "XNBD_WAN_PIPELINE=0: hello flags $flags ask EARLY"

# 3. xnbds:// (TLS first): no EARLY.
psktool -u alice -p "$TESTDIR/keys.psk" >/dev/null 2>&1 || fail "psktool failed"
hello_probe tls -- xnbds --tls-psk "$TESTDIR/keys.psk"
read -r flags extra first < "$TESTDIR/tls.probe"
echo "xnbds://: hello flags $flags"
(( flags >= 0 && (flags & 2) && !(flags & 4) )) || fail "xnbds://: hello flags $flags"

# 4. A real server with --compress=off, through a recording relay.
start_server xnbd-server -r -W 127.0.0.1:0 --wan-port-file "$TESTDIR/wan.port" \
    -u "$TESTDIR/srv.sock" --compress=off "$img"
srv=$SERVER_PID
start_tap "$(cat "$TESTDIR/wan.port")" "$TESTDIR/cap"
d=$TESTDIR/off
mkdir -p "$d"
start_proxy --target "xnbd://127.0.0.1:$TAP_PORT/" --cache "$d/cache" \
    --bitmap "$d/bm" --control "$d/ctl" -u "$d/px.sock" --cache-all
wait_state "$d/ctl" complete 60
qemu-img compare -q -f raw -F raw "$img" "nbd+unix:///?socket=$d/px.sock" ||
  fail "--compress=off server: the proxy's copy differs from the image"
rx=$(proxy_status "$d/ctl" wire.rx) raw=$(proxy_status "$d/ctl" wire.rx_raw)
tx=$(proxy_status "$d/ctl" wire.tx) txraw=$(proxy_status "$d/ctl" wire.tx_raw)
echo "--compress=off: wire rx $rx bytes for $raw bytes of NBD, tx $tx for $txraw"
(( rx == raw )) || fail "--compress=off: the server's direction was compressed ($rx of $raw)"
(( tx < txraw )) || fail "--compress=off: the proxy's direction was not compressed ($tx of $txraw)"
stop_server "$PROXY_PID" >/dev/null
n=$(grep -c -a "EARLY-HELLO-MARKER" "$TESTDIR/cap" || true)
(( n > 0 )) || fail "--compress=off: the image's text did not cross in the clear"
stop_server "$srv" >/dev/null
echo OK
