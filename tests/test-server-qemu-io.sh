#!/usr/bin/env bash
# qemu-io against xnbd-server: pattern writes read back with verification,
# write -z and discard read back as zeros, flush, FUA, unaligned small
# writes and one 32 MiB request.  The same commands are applied to a local
# model copy of the image; at the end the served image must equal it.
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img cmp

img=$TESTDIR/disk.img
model=$TESTDIR/model.img
sock=$TESTDIR/sock
make_image "$img" 64M
cp --sparse=always "$img" "$model"

start_server xnbd-server -u "$sock" "$img"
pid=$SERVER_PID
uri=$(nbd_unix_uri "$sock")

M=$((1024 * 1024))
writes=(
  "write -P 0x01 $((32 * M)) 32M"              # one 32 MiB request
  "write -P 0xab 0 64k"
  "write -P 0xcd $((1 * M)) 1M"
  "write -f -P 0x3c $((3 * M)) 256k"           # FUA
  "write -z $((2 * M)) 1M"
  "write -P 0x77 $((4 * M)) 1M"
  "discard $((4 * M)) 1M"
  "write -P 0x11 12345 777"                    # unaligned, small
  "write -P 0x22 65535 3"
  "write -P 0x33 $((6 * M - 1)) 2"             # straddles a MiB boundary
  "write -P 0x44 $((64 * M - 513)) 513"        # ends exactly at the end
  "write -z $((7 * M + 100)) 5000"             # unaligned zeroing
)
checks=(
  "read -P 0xab 0 12345"
  "read -P 0xab 13122 52413"
  "read -P 0xcd $((1 * M)) 1M"
  "read -P 0x3c $((3 * M)) 256k"
  "read -P 0 $((2 * M)) 1M"
  "read -P 0 $((4 * M)) 1M"
  "read -P 0x11 12345 777"
  "read -P 0x22 65535 3"
  "read -P 0x33 $((6 * M - 1)) 2"
  "read -P 0x44 $((64 * M - 513)) 513"
  "read -P 0 $((7 * M + 100)) 5000"
  "read -P 0x01 $((32 * M)) $((32 * M - 513))"
)

# Through the server, then verify on a second connection.
qio "$uri" "${writes[@]}" flush
qio "$uri" "${checks[@]}"
# The model gets the same writes locally.
qio "$model" "${writes[@]}"

# A read that must NOT match proves the verification can fail.
out=$(qemu-io -f raw -c "read -P 0xab $((1 * M)) 4k" "$uri" 2>&1) || true
grep -q 'Pattern verification failed' <<<"$out" ||
  fail "read -P with a wrong pattern did not report a mismatch: $out"

# Whole-image comparison through the server and on disk after shutdown.
qemu-img compare -f raw -F raw "$model" "$uri" ||
  fail "served image differs from the model"
assert_alive "$pid"
stop_ok "$pid" xnbd-server
same_content "$img" "$model"
echo "OK"
