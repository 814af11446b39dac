#!/usr/bin/env bash
# Several clients on one export at once: 4 qemu-io writers on disjoint
# 16 MiB regions (1 MiB and unaligned writes) while 2 readers copy an
# untouched export of the same server; every writer must succeed, every
# region must read back its pattern, and the image must equal the model.
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img nbdcopy cmp

M=$((1024 * 1024))
img=$TESTDIR/disk.img
model=$TESTDIR/model.img
ro=$TESTDIR/other.img
make_image "$img" 64M 7
make_image "$ro" 32M 8
cp --sparse=always "$img" "$model"
sock=$TESTDIR/sock
start_server xnbd-server -u "$sock" -e other="$ro" "$img"
pid=$SERVER_PID
uri=$(nbd_unix_uri "$sock")

cmds_for () {   # region index -> qemu-io commands
  local i=$1 base=$(( $1 * 16 * M )) j
  local pat=$(( 0x10 + i ))
  for (( j = 0; j < 15; j++ )); do
    echo "write -P $pat $(( base + j * M )) 1M"
  done
  echo "write -P $(( pat + 0x80 )) $(( base + 15 * M + 3 )) 4093"
  echo "write -z $(( base + 15 * M + 8192 )) 65536"
}

pids=()
for i in 0 1 2 3; do
  mapfile -t c < <(cmds_for "$i")
  args=()
  for x in "${c[@]}"; do args+=(-c "$x"); done
  qemu-io -f raw "${args[@]}" "$uri" >"$TESTDIR/w$i.log" 2>&1 &
  pids+=($!)
done
nbdcopy "$(nbd_unix_uri "$sock" other)" "$TESTDIR/r1.img" &
pids+=($!)
nbdcopy -C 2 "$(nbd_unix_uri "$sock" other)" "$TESTDIR/r2.img" &
pids+=($!)

n=0
for p in "${pids[@]}"; do
  st=0; wait "$p" || st=$?
  [ "$st" -eq 0 ] || { cat "$TESTDIR"/w*.log >&2; fail "client $n (PID $p) exited with status $st"; }
  n=$((n + 1))
done
for i in 0 1 2 3; do
  if grep -qiE 'fail|error' "$TESTDIR/w$i.log"; then
    cat "$TESTDIR/w$i.log" >&2
    fail "writer $i reported an error"
  fi
done
same_content "$ro" "$TESTDIR/r1.img"
same_content "$ro" "$TESTDIR/r2.img"

# Each region reads back its own pattern (a fresh connection).
for i in 0 1 2 3; do
  base=$(( i * 16 * M )); pat=$(( 0x10 + i ))
  qio "$uri" "read -P $pat $base $(( 15 * M ))" \
             "read -P $(( pat + 0x80 )) $(( base + 15 * M + 3 )) 4093" \
             "read -P 0 $(( base + 15 * M + 8192 )) 65536"
done

for i in 0 1 2 3; do
  mapfile -t c < <(cmds_for "$i")
  qio "$model" "${c[@]}"
done
qemu-img compare -f raw -F raw "$model" "$uri" || fail "served image differs from the model"
assert_alive "$pid"
stop_ok "$pid" xnbd-server
same_content "$img" "$model"
echo OK
