# proxy-clients-common.sh: the body of test-proxy-clients-*.sh, sourced by
# each of them after functions.sh.  The caller defines
#
#   start_source IMAGE SOCKET   start a read-only NBD server of IMAGE on the
#                               unix SOCKET
#
# and then calls run_proxy_clients_test.  The proxy serves the source with
# the background copy running (rate-capped, so it is still running while the
# clients work): qemu-io pattern writes (aligned, unaligned, partial-block,
# zeroing, discard, FUA) to blocks most likely not fetched yet, read back with
# read -P; fio randrw with crc32c verification on one 16 MiB region; nbdcopy of
# the whole export.  Every write is applied to a model copy of the source;
# at the end the served disk, nbdcopy's copy and the cache image must all
# equal the model, and the source image must be unchanged (I6).

run_proxy_clients_test ()
{
  requires qemu-io qemu-img nbdcopy fio python3 cmp

  local M=$((1024 * 1024))
  local src=$TESTDIR/src.img model=$TESTDIR/model.img copy=$TESTDIR/copy.img
  local ssock=$TESTDIR/src.sock psock=$TESTDIR/proxy.sock ctlsock=$TESTDIR/ctl
  local cache=$TESTDIR/cache.img bitmap=$TESTDIR/cache.bitmap
  make_image "$src" 64M 3
  cp --sparse=always "$src" "$model"
  local src_sha
  src_sha=$(sha "$src")

  start_source "$src" "$ssock"
  start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$cache" \
    --bitmap "$bitmap" --control "$ctlsock" -u "$psock" \
    --cache-all --bg-rate 10M
  local pid=$PROXY_PID uri
  uri=$(nbd_unix_uri "$psock")
  wait_status "$ctlsock" 30 'j["state"] in ("proxying", "complete")'

  # The background copy must still be running while the clients start.
  local missing
  missing=$(proxy_status "$ctlsock" blocks.missing)
  echo "missing blocks when the clients start: $missing"
  [ "$missing" -gt 0 ] ||
    fail "the background copy finished before any client I/O (bg-rate ignored?)"

  # Writes go to the end of the image first: the background copy is least
  # likely to have reached it, so these exercise read-modify-write of
  # missing blocks (I1).
  local writes=(
    "write -P 0x11 $((60 * M + 100)) 1000"            # inside one block
    "write -P 0x22 $((61 * M - 3)) 7"                 # straddles blocks and chunks
    "write -P 0x33 $((50 * M + 3 * 4096 + 512)) 8192" # 3 blocks, partial ends
    "write -z $((55 * M + 1000)) 10000"               # unaligned zeroing
    "write -P 0x44 $((45 * M)) 1M"                    # aligned, whole blocks
    "discard $((47 * M)) 64k"                         # whole missing blocks
    "write -f -P 0x55 $((63 * M + 4096)) 4096"        # FUA
    "write -P 0x66 $((64 * M - 100)) 100"             # ends at the end
    "write -P 0x77 $((40 * M + 4095)) 2"              # straddles one boundary
    "write -P 0x88 $((8 * M + 513)) 70000"            # early, unaligned
  )
  local checks=(
    "read -P 0x11 $((60 * M + 100)) 1000"
    "read -P 0x22 $((61 * M - 3)) 7"
    "read -P 0x33 $((50 * M + 3 * 4096 + 512)) 8192"
    "read -P 0 $((55 * M + 1000)) 10000"
    "read -P 0x44 $((45 * M)) 1M"
    "read -P 0 $((47 * M)) 64k"
    "read -P 0x55 $((63 * M + 4096)) 4096"
    "read -P 0x66 $((64 * M - 100)) 100"
    "read -P 0x77 $((40 * M + 4095)) 2"
    "read -P 0x88 $((8 * M + 513)) 70000"
  )
  local w
  for w in "${writes[@]}"; do
    qio "$uri" "$w"
  done
  qio "$uri" flush
  # Partial writes to blocks not fetched yet must fetch them first; the copy
  # runs from offset 0 up, so the ones near the end found missing blocks.
  local ondemand
  ondemand=$(proxy_status "$ctlsock" fetches.ondemand)
  echo "on-demand fetches after the writes: $ondemand"
  [ "$ondemand" -gt 0 ] ||
    fail "no partial write reached a missing block (fetches.ondemand is 0)"
  qio "$uri" "${checks[@]}"
  qio "$model" "${writes[@]}"
  # The unwritten bytes around the partial writes still hold source data.
  _check_ranges_equal "$model" "$uri" \
    $((60 * M)):100 $((60 * M + 1100)):3000 $((61 * M - 4096)):4093 \
    $((50 * M + 3 * 4096)):512 $((50 * M + 3 * 4096 + 512 + 8192)):3584 \
    $((55 * M)):1000 $((40 * M)):4095 $((8 * M)):513

  # fio: random reads and writes with crc32c verification in [16M, 32M).
  local fio_off=$((16 * M)) fio_len=$((16 * M)) st=0
  fio --name=proxy-randrw --ioengine=nbd --uri="$uri" \
      --offset="$fio_off" --size="$fio_len" --rw=randrw --bs=4k --iodepth=8 \
      --io_size=8M --verify=crc32c --verify_fatal=1 --do_verify=1 \
      --randseed=42 --verify_state_save=0 --output="$TESTDIR/fio.out" || st=$?
  cat "$TESTDIR/fio.out"
  [ "$st" -eq 0 ] || fail "fio exited with status $st"
  grep -q 'err= 0' "$TESTDIR/fio.out" || fail "fio reported an error"
  echo "missing blocks after fio: $(proxy_status "$ctlsock" blocks.missing)"

  # nbdcopy of the whole export.
  nbdcopy "$uri" "$copy" || fail "nbdcopy $uri $copy failed"

  # fio's region: each 4 KiB block is either the source's or a block fio
  # wrote (its verify header names that very offset).  Then the model takes
  # fio's data so the whole images can be compared.
  _check_fio_region "$src" "$copy" "$fio_off" "$fio_len"
  dd if="$copy" of="$model" bs=1M skip=$((fio_off / M)) seek=$((fio_off / M)) \
     count=$((fio_len / M)) conv=notrunc,sparse status=none
  same_content "$copy" "$model"

  wait_state "$ctlsock" complete 120
  qio "$uri" "${checks[@]}"
  qemu-img compare -f raw -F raw "$model" "$uri" ||
    fail "the proxy's disk differs from the model after the copy completed"
  assert_alive "$pid"
  stop_ok "$pid" xnbd-proxy
  same_content "$cache" "$model"
  [ "$(sha "$src")" = "$src_sha" ] || fail "the source image changed (I6)"
  echo OK
}

# _check_ranges_equal FILE URI OFF:LEN...: those byte ranges (small ones) of
# FILE and of the NBD export are identical (compared as qemu-io hex dumps).
_check_ranges_equal ()
{
  local file=$1 uri=$2 r off len got want; shift 2
  for r in "$@"; do
    off=${r%%:*} len=${r##*:}
    want=$(qemu-io -f raw -c "read -v $off $len" "$file" | grep -v '^read\|ops/sec')
    got=$(qemu-io -f raw -c "read -v $off $len" "$uri" | grep -v '^read\|ops/sec')
    [ -n "$want" ] && [ "$got" = "$want" ] ||
      fail "bytes $off+$len differ between the model and the proxy"
  done
}

_check_fio_region ()
{
  python3 - "$@" <<'EOF'
import struct, sys
src, copy, off, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
bs = 4096
fio_blocks = 0
with open(src, "rb") as a, open(copy, "rb") as b:
    a.seek(off); b.seek(off)
    for i in range(length // bs):
        x, y = a.read(bs), b.read(bs)
        if x == y:
            continue
        magic, _vtype, vlen = struct.unpack_from("<HHI", y, 0)
        voff, = struct.unpack_from("<Q", y, 16)
        where = off + i * bs
        if magic != 0xacca or vlen != bs or voff != where:
            sys.exit("FAIL: block at %d is neither the source's data nor a fio "
                     "block written there (magic %#x len %d offset %d)"
                     % (where, magic, vlen, voff))
        fio_blocks += 1
if fio_blocks == 0:
    sys.exit("FAIL: no fio-written block found in the fio region")
print("fio region: %d blocks written by fio, the rest equal the source" % fio_blocks)
EOF
}
