#!/usr/bin/env bash
# TLS on the link between xnbd-proxy and its source: an eavesdropper on the
# link (a recording relay) sees the image's text with plain NBD, and never
# with xnbds:// (our transport, TLS over zstd), nbds:// to xnbd-server
# (NBD_OPT_STARTTLS) or nbds:// to nbdkit --tls.  PSK and X.509 both.
source "$(dirname "$0")/functions.sh"
requires psktool certtool nbdkit qemu-img python3

img=$TESTDIR/src.img
make_text_image "$img" CONFIDENTIAL-PAYROLL-RECORD 2048     # 8 MiB
psktool -u alice -p "$TESTDIR/keys.psk" >/dev/null 2>&1 || fail "psktool failed"

# X.509: a CA, a server certificate for 127.0.0.1 (certtool templates).
certs=$TESTDIR/pki
mkdir -p "$certs"
(
  cd "$certs"
  printf 'cn = xnbd test CA\nca\ncert_signing_key\nexpiration_days = 2\n' > ca.info
  printf 'organization = xnbd\ncn = localhost\nip_address = 127.0.0.1\ndns_name = localhost\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 2\n' > server.info
  certtool --generate-privkey --outfile ca-key.pem
  certtool --generate-self-signed --load-privkey ca-key.pem --template ca.info --outfile ca-cert.pem
  certtool --generate-privkey --outfile server-key.pem
  certtool --generate-certificate --load-privkey server-key.pem --load-ca-certificate ca-cert.pem \
           --load-ca-privkey ca-key.pem --template server.info --outfile server-cert.pem
) >/dev/null 2>&1 || fail "certtool could not make test certificates"


# migrate TARGET_URI CAPTURE [proxy options]: full copy through the tap,
# then compare with the source.
n=0
migrate() {
  local uri=$1 capture=$2; shift 2
  n=$((n + 1))
  local d=$TESTDIR/run$n
  mkdir -p "$d"
  start_proxy --target "$uri" --cache "$d/cache" --bitmap "$d/bm" \
      --control "$d/ctl" -u "$d/px.sock" --cache-all "$@"
  wait_state "$d/ctl" complete 60
  qemu-img compare -q -f raw -F raw "$img" "nbd+unix:///?socket=$d/px.sock" ||
    fail "$uri: proxy content differs from the source"
  stop_server "$PROXY_PID" >/dev/null
  stop_tap
  [[ -s $capture ]] || fail "$uri: nothing was captured on the link"
}
leaks() { grep -c -a "CONFIDENTIAL-PAYROLL" "$1" || true; }

# 1. Plain NBD: the eavesdropper reads the data (so this test can fail).
start_server xnbd-server -r -l 127.0.0.1:0 --port-file "$TESTDIR/plain.port" "$img"
plain_srv=$SERVER_PID
start_tap "$(cat "$TESTDIR/plain.port")" "$TESTDIR/cap-plain"
migrate "nbd://127.0.0.1:$TAP_PORT/" "$TESTDIR/cap-plain"
(( $(leaks "$TESTDIR/cap-plain") > 0 )) || fail "plain NBD: marker not seen on the link (tap broken?)"
stop_server "$plain_srv" >/dev/null

# 2. xnbds:// with PSK (TLS over zstd) to xnbd-server --tls=require.
start_server xnbd-server -r -W 127.0.0.1:0 --wan-port-file "$TESTDIR/wan.port" \
    -u "$TESTDIR/tls.sock" --tls=require --tls-psk "$TESTDIR/keys.psk" "$img"
tls_srv=$SERVER_PID
start_tap "$(cat "$TESTDIR/wan.port")" "$TESTDIR/cap-xnbds"
migrate "xnbds://127.0.0.1:$TAP_PORT/" "$TESTDIR/cap-xnbds" --tls-psk "$TESTDIR/keys.psk"
(( $(leaks "$TESTDIR/cap-xnbds") == 0 )) || fail "xnbds://: plaintext seen on the link"
head -c 8 "$TESTDIR/cap-xnbds" | grep -q XNBDWAN || fail "xnbds://: no transport handshake captured"

# 3. A plain client is refused by --tls=require (WAN port and NBD port).
rm -rf "$TESTDIR/refused"; mkdir "$TESTDIR/refused"
if "$XNBD_BUILD/xnbd-proxy" --target "xnbd://127.0.0.1:$(cat "$TESTDIR/wan.port")/" \
     --cache "$TESTDIR/refused/c" --bitmap "$TESTDIR/refused/b" --control "$TESTDIR/refused/ctl" \
     -u "$TESTDIR/refused/s" --source-timeout 5 2>"$TESTDIR/refused.log"; then
  fail "a proxy without TLS was accepted by --tls=require"
fi
grep -q "requires TLS" "$TESTDIR/refused.log" || fail "refusal does not say TLS is required: $(cat "$TESTDIR/refused.log")"
if nbdinfo "nbd+unix:///?socket=$TESTDIR/tls.sock" >/dev/null 2>&1; then
  fail "plain NBD client accepted on the NBD port of a --tls=require server"
fi
stop_server "$tls_srv" >/dev/null

# 4. nbds:// (NBD_OPT_STARTTLS) with X.509 to xnbd-server.
start_server xnbd-server -r -l 127.0.0.1:0 --port-file "$TESTDIR/x509.port" \
    --tls=require --tls-certificates "$certs" "$img"
x509_srv=$SERVER_PID
start_tap "$(cat "$TESTDIR/x509.port")" "$TESTDIR/cap-nbds"
# The tap is a different address than the certificate names: it is still
# 127.0.0.1, which the certificate lists.
migrate "nbds://127.0.0.1:$TAP_PORT/" "$TESTDIR/cap-nbds" --tls-certificates "$certs"
(( $(leaks "$TESTDIR/cap-nbds") == 0 )) || fail "nbds:// to xnbd-server: plaintext seen on the link"
stop_server "$x509_srv" >/dev/null

# 5. nbds:// with PSK to nbdkit --tls=require.
start_nbdkit -r -U "$TESTDIR/nbdkit.sock" --tls=require --tls-psk="$TESTDIR/keys.psk" file "$img"
start_tap "$TESTDIR/nbdkit.sock" "$TESTDIR/cap-nbdkit"
migrate "nbds://alice@127.0.0.1:$TAP_PORT/" "$TESTDIR/cap-nbdkit" --tls-psk "$TESTDIR/keys.psk"
(( $(leaks "$TESTDIR/cap-nbdkit") == 0 )) || fail "nbds:// to nbdkit: plaintext seen on the link"
echo "TLS: no plaintext on the link for xnbds:// (PSK), nbds:// (X.509, STARTTLS), nbds:// to nbdkit (PSK)"
