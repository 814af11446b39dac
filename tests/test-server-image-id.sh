#!/usr/bin/env bash
# xnbd-server publishes a per-image identity as the export description
# (nbdinfo --json "description"): "xnbd-image-id=<32 hex> gen=<N>".  It is
# the same after a clean restart and after writes THROUGH the server; an
# edit made while the server is stopped keeps the id and bumps gen; another
# image gets another id; --image-id=stat derives it without writing the
# IMAGE.xnbd-id sidecar; --image-id=off publishes nothing.
source "$(dirname "$0")/functions.sh"
requires nbdinfo qemu-io python3

img=$TESTDIR/a.img other=$TESTDIR/b.img
make_image "$img" 8M 1
make_image "$other" 8M 2
sock=$TESTDIR/sock
uri=$(nbd_unix_uri "$sock")

# description URI -- the export's description from nbdinfo --json ("" if none).
description () {
  nbdinfo --json "$1" | python3 -c '
import json, sys
j = json.load(sys.stdin)
print(j["exports"][0].get("description", ""))'
}
# id_of DESC / gen_of DESC
id_of () { sed -n 's/^xnbd-image-id=\([0-9a-f]\{32\}\) gen=[0-9]\+.*$/\1/p' <<<"$1"; }
gen_of () { sed -n 's/^xnbd-image-id=[0-9a-f]\{32\} gen=\([0-9]\+\).*$/\1/p' <<<"$1"; }

serve () { start_server xnbd-server -u "$sock" "$@"; }

# ---- a new image: id and gen 0, sidecar next to it
serve "$img"
d1=$(description "$uri")
echo "description: $d1"
id1=$(id_of "$d1")
[ -n "$id1" ] || fail "the description '$d1' is not 'xnbd-image-id=<32 hex> gen=<N>'"
[ "$(gen_of "$d1")" = 0 ] || fail "a new image has gen $(gen_of "$d1"), expected 0"
[ -f "$img.xnbd-id" ] || fail "no sidecar $img.xnbd-id"
grep -qx "id=$id1" "$img.xnbd-id" || fail "the sidecar does not hold id $id1: $(cat "$img.xnbd-id")"
# NBD_OPT_LIST carries it too.
nbdinfo --list "$uri" | grep -q "description: xnbd-image-id=$id1 gen=0" ||
  fail "nbdinfo --list does not show the description"
# Writes through the server (a VM's own writes) ...
qio "$uri" "write -P 0x61 4096 4096"
stop_ok "$SERVER_PID" xnbd-server
grep -qx "state=clean" "$img.xnbd-id" || fail "the sidecar does not record the clean stop"

# ---- ... keep id and gen across a clean restart
serve "$img"
d2=$(description "$uri")
[ "$d2" = "$d1" ] || fail "after writes through the server and a restart the description is '$d2', expected '$d1'"
stop_ok "$SERVER_PID" xnbd-server

# ---- an edit while the server is stopped: same id, gen 1 (and it stays 1)
dd if=/dev/urandom of="$img" bs=4096 seek=100 count=1 conv=notrunc status=none
serve "$img"
d3=$(description "$uri")
echo "after the edit: $d3"
[ "$(id_of "$d3")" = "$id1" ] || fail "an edit changed the image id: '$d3'"
[ "$(gen_of "$d3")" = 1 ] || fail "an edit behind the server's back left gen at $(gen_of "$d3"), expected 1"
grep -q "generation 0 -> 1" "$SERVER_LOG" || fail "the server did not log why gen changed"
stop_ok "$SERVER_PID" xnbd-server
serve "$img"
[ "$(description "$uri")" = "$d3" ] || fail "the new generation was not kept across a restart"
stop_ok "$SERVER_PID" xnbd-server

# ---- another image (even of the same size) has another id; two exports
serve -e a="$img" -e b="$other"
da=$(description "$(nbd_unix_uri "$sock" a)") db=$(description "$(nbd_unix_uri "$sock" b)")
[ "$(id_of "$da")" = "$id1" ] || fail "export a: '$da', expected id $id1"
[ -n "$(id_of "$db")" ] && [ "$(id_of "$db")" != "$id1" ] ||
  fail "export b (another image) has description '$db'"
stop_ok "$SERVER_PID" xnbd-server

# ---- --image-id=stat: derived, nothing written
rm -f "$other.xnbd-id"
serve --image-id=stat "$other"
ds=$(description "$uri")
echo "--image-id=stat: $ds"
[ -n "$(id_of "$ds")" ] && [[ "$ds" == *" id-from=stat" ]] ||
  fail "--image-id=stat published '$ds'"
stop_ok "$SERVER_PID" xnbd-server
[ ! -e "$other.xnbd-id" ] || fail "--image-id=stat wrote $other.xnbd-id"

# ---- --image-id=off: no description; bad values refused
serve --image-id=off "$img"
doff=$(description "$uri")
[ -z "$doff" ] || fail "--image-id=off still published '$doff'"
stop_ok "$SERVER_PID" xnbd-server
st=0
"$XNBD_BUILD/xnbd-server" --image-id=maybe -u "$sock" "$img" 2>"$TESTDIR/bad.err" || st=$?
[ "$st" -eq 1 ] && grep -q "sidecar, stat or off" "$TESTDIR/bad.err" ||
  fail "--image-id=maybe: status $st, message '$(cat "$TESTDIR/bad.err")'"
echo OK
