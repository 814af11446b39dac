#!/usr/bin/env bash
# Malformed and hostile input (tests/tools/nbd-badinput.c) against
# xnbd-server --handshake-timeout 2, over a unix socket and over TCP.
# Afterwards the server must still be running and serving, and the image
# must equal a model copy to which the writes the server acknowledged were
# applied: no byte outside them may have changed.
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img nbdcopy cmp
badinput=$XNBD_BUILD/tests/nbd-badinput
[ -x "$badinput" ] || fail "$badinput not built (run make)"

img=$TESTDIR/disk.img
model=$TESTDIR/model.img
make_image "$img" 64M 11
cp --sparse=always "$img" "$model"
sock=$TESTDIR/sock
start_server xnbd-server --handshake-timeout 2 -u "$sock" -l 127.0.0.1:0 \
  --port-file "$TESTDIR/port" "$img"
pid=$SERVER_PID
port=$(cat "$TESTDIR/port")
[[ $port =~ ^[0-9]+$ ]] && [ "$port" -gt 0 ] || fail "port file holds '$port'"

wlog=$TESTDIR/writes.log
: >"$wlog"
st=0
"$badinput" --unix "$sock" --size 64M --handshake-timeout 2 --write-log "$wlog" || st=$?
# The TCP path: the same negotiation and framing over a stream socket.
"$badinput" --tcp "127.0.0.1:$port" --size 64M --handshake-timeout 2 \
  --write-log "$wlog" || st=$?

assert_alive "$pid"

# Still serving, and the image holds exactly the acknowledged writes.
cmds=()
while read -r off len byte; do
  cmds+=("write -P $byte $off $len")
done <"$wlog"
echo "applying ${#cmds[@]} acknowledged writes to the model"
[ "${#cmds[@]}" -eq 0 ] || qio "$model" "${cmds[@]}"
qemu-img compare -f raw -F raw "$model" "$(nbd_unix_uri "$sock")" ||
  fail "image differs from the model after bad input"
nbdcopy "nbd://127.0.0.1:$port" "$TESTDIR/copy.img"
same_content "$model" "$TESTDIR/copy.img"

[ "$st" -eq 0 ] || fail "nbd-badinput reported failing cases (see above)"
assert_alive "$pid"
stop_ok "$pid" xnbd-server
same_content "$img" "$model"
echo OK
