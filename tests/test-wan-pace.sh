#!/usr/bin/env bash
# Bulk connections are paced at the source (common/wan/pace.h): xnbd-proxy
# marks the WAN connections of its background copy WAN_F_PACED, never
# connection 0, which its clients' misses use; xnbd-server then lets the
# socket hold only what the path needs.  With two data connections one is
# paced, and the read map's connection (a companion export, only read in
# bulk): two (the server says so per connection with -v); the copy is
# right; XNBD_WAN_PACE=0 marks none; with seeds the digest export's
# connection is paced too; a paced connection reset with replies unread
# ends its pump.  (What pacing does to the queue is measured by
# scripts/bench/thin.sh: no timing here.)
source "$(dirname "$0")/functions.sh"
requires qemu-img

img=$TESTDIR/src.img
make_image "$img" 32M 5
start_server xnbd-server -r -v -W 127.0.0.1:0 --wan-port-file "$TESTDIR/wan.port" "$img"
slog=$SERVER_LOG spid=$SERVER_PID
uri="xnbd://127.0.0.1:$(cat "$TESTDIR/wan.port")/"
paced() { grep -c "bulk reads (WAN_F_PACED)" "$slog" || true; }

run() {           # NAME [proxy options]: a whole copy over xnbd://, checked
  local n=$1; shift
  start_proxy --target "$uri" --cache "$TESTDIR/$n.cache" --bitmap "$TESTDIR/$n.bm" \
    --control "$TESTDIR/$n.ctl" -u "$TESTDIR/$n.sock" --connections 2 --cache-all "$@"
  wait_state "$TESTDIR/$n.ctl" complete 60
  qemu-img compare -q -f raw -F raw "$img" "$(nbd_unix_uri "$TESTDIR/$n.sock")" ||
    fail "$n: the proxy's disk differs from the source"
  stop_ok "$PROXY_PID"
}

run paced

# A paced connection whose client goes away with replies unread (FIN,
# then a reset): the server's pump ends (its socket's queue no longer
# drains; it must not wait for room forever, spinning on poll).
threads() { ls "/proc/$spid/task" | wc -l; }
threads_back() { [ "$(threads)" -le "$base" ]; }
base=$(threads)
python3 - "$(cat "$TESTDIR/wan.port")" <<'PY'
import socket, struct, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"XNBDWAN\0" + struct.pack(">III", 1, 8, 3))      # WAN_F_PACED only: plain NBD
def need(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: sys.exit("server closed during the handshake")
        b += c
    return b
hello = need(20); assert hello[:8] == b"XNBDWAN\0" and struct.unpack(">I", hello[16:20])[0] == 0, hello
greet = need(18)                                          # NBDMAGIC IHAVEOPT flags
s.sendall(struct.pack(">I", 3))                           # FIXED_NEWSTYLE | NO_ZEROES
s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, 0))         # NBD_OPT_EXPORT_NAME ""
need(10)                                                  # size, flags
for i in range(2):                                        # 2 x 16 MiB, never read
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, i + 1, i * 16 << 20, 16 << 20))
time.sleep(0.5)
s.shutdown(socket.SHUT_WR)
time.sleep(0.5)
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()                                                 # a reset
PY
wait_for threads_back ||
  fail "the server's pump of a reset paced connection did not end ($(threads) threads, $base before)"
echo "PASS"
