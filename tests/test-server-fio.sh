#!/usr/bin/env bash
# fio --ioengine=nbd against xnbd-server: random reads and writes with
# crc32c verification, 4 KiB and mixed block sizes, several requests in
# flight.  fio must finish cleanly with no verification error.
source "$(dirname "$0")/functions.sh"
requires fio

img=$TESTDIR/disk.img
make_image "$img" 64M
sock=$TESTDIR/sock
start_server xnbd-server -u "$sock" "$img"
pid=$SERVER_PID
uri=$(nbd_unix_uri "$sock")

run_fio () {
  local name=$1; shift
  local st=0
  # From $TESTDIR, without a verify state file: nothing lands in the tree.
  (cd "$TESTDIR" && fio --name="$name" --ioengine=nbd --uri="$uri" --size=64M \
      --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 \
      --output="$TESTDIR/$name.out" "$@") || st=$?
  cat "$TESTDIR/$name.out"
  [ "$st" -eq 0 ] || fail "fio job $name exited with status $st"
  if grep -qiE 'verify.*(fail|bad)|bad magic|crc32c.*wanted' "$TESTDIR/$name.out"; then
    fail "fio job $name reported verification errors"
  fi
  grep -q 'err= 0' "$TESTDIR/$name.out" || fail "fio job $name reported an error"
}

run_fio randrw-4k --rw=randrw --bs=4k --iodepth=16 --io_size=16M
run_fio randwrite-mixed --rw=randwrite --bsrange=512-128k --iodepth=8 --io_size=24M
run_fio seqwrite-1m --rw=write --bs=1M --iodepth=4 --io_size=64M

assert_alive "$pid"
echo OK
