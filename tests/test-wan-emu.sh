#!/usr/bin/env bash
# The WAN emulator (scripts/wan-emu) gives what it was asked for, measured
# through the delay path a dst client uses (netem, or build/wan-relay where
# the kernel has no sch_netem): up --rtt 40ms --rate 100mbit; the TCP RTT of
# 1-byte ping-pongs is 40 ms (+-10% + 1 ms); 25 MB each way arrive intact
# at 100 Mbit/s on the wire (+-10%); the relay's jitter and loss models
# hold; `down` removes the namespaces, the relays and the state.
source "$(dirname "$0")/functions.sh"
requires ip tc python3 awk

WAN_EMU=$XNBD_SRC/scripts/wan-emu/wan-emu
[ -x "$XNBD_BUILD/wan-relay" ] || fail "$XNBD_BUILD/wan-relay not built (run make)"

# Skip only where network namespaces cannot exist (not root, no netns).
probe_ns=xnbd-probe-$$
if [ "$(id -u)" -ne 0 ] || ! ip netns add "$probe_ns" 2>/dev/null; then
  skip "cannot create network namespaces here (needs root and CONFIG_NET_NS)"
fi
ip netns del "$probe_ns"

name=t$$
export WAN_EMU_STATE=$TESTDIR/state     # removed with TESTDIR
wan () { "$WAN_EMU" --name "$name" "$@"; }
# Cleanup runs last registered first: the probes stop, then the WAN goes.
cleanup_fn "$WAN_EMU" --name "$name" down
probe_pids=()
stop_probes ()
{
  local pid
  for pid in "${probe_pids[@]}"; do stop_server "$pid" >/dev/null 2>&1 || true; done
  probe_pids=()
}
cleanup_fn stop_probes
ECHO_PORT=5001 SINK_PORT=5002 SOURCE_PORT=5003 BYTES=25000000

# ---------------------------------------------------------------- probes
# Ports are those of the private namespaces: nothing else can hold them.
probe=$TESTDIR/probe.py
cat >"$probe" <<'EOF'
"""TCP probes for the WAN emulator test.

serve --pidfile F --addr A --echo P --sink P --source P --bytes N
    echo:   echoes every byte back until EOF.
    sink:   reads until EOF, then answers "BYTES SHA256 MBIT" and closes
            (MBIT: rate from the first to the last byte, first read excluded).
    source: sends N deterministic bytes, then shuts down its write side.
rtt HOST:PORT COUNT      1-byte ping-pongs; prints median, min, max, 10th
                         and 90th percentile in ms.
send HOST:PORT BYTES     sends BYTES to a sink; prints "MBIT SHA-OK".
recv HOST:PORT BYTES     reads from a source until EOF; prints "MBIT SHA-OK".
"""
import hashlib, os, random, socket, statistics, sys, threading, time

BLOCK = random.Random(42).randbytes(1 << 20)


def stream(nbytes):
    while nbytes > 0:
        n = min(nbytes, len(BLOCK))
        yield BLOCK[:n]
        nbytes -= n


def expected_sha(nbytes):
    h = hashlib.sha256()
    for b in stream(nbytes):
        h.update(b)
    return h.hexdigest()


def receive_all(s):
    """Reads until EOF; returns (bytes, sha, mbit over the steady part)."""
    h = hashlib.sha256()
    total = first_len = 0
    t_first = t_last = None
    while True:
        b = s.recv(1 << 18)
        if not b:
            break
        now = time.monotonic()
        if t_first is None:
            t_first, first_len = now, len(b)
        t_last = now
        total += len(b)
        h.update(b)
    mbit = 0.0
    if t_first is not None and t_last > t_first:
        mbit = (total - first_len) * 8 / (t_last - t_first) / 1e6
    return total, h.hexdigest(), mbit


def listener(addr, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen(16)
    return s


def serve_forever(lsock, handler):
    while True:
        c, _ = lsock.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handler, args=(c,), daemon=True).start()


def h_echo(c):
    with c:
        while True:
            b = c.recv(65536)
            if not b:
                break
            c.sendall(b)


def h_sink(c):
    with c:
        total, sha, mbit = receive_all(c)
        c.sendall(f"{total} {sha} {mbit:.3f}\n".encode())


def make_source(nbytes):
    def h_source(c):
        with c:
            for b in stream(nbytes):
                c.sendall(b)
            c.shutdown(socket.SHUT_WR)
            while c.recv(4096):
                pass
    return h_source


def serve(args):
    opts = dict(zip(args[::2], args[1::2]))
    addr = opts["--addr"]
    handlers = [(int(opts["--echo"]), h_echo), (int(opts["--sink"]), h_sink),
                (int(opts["--source"]), make_source(int(opts["--bytes"])))]
    socks = [(listener(addr, p), h) for p, h in handlers]
    for ls, h in socks:
        threading.Thread(target=serve_forever, args=(ls, h), daemon=True).start()
    with open(opts["--pidfile"], "w") as f:
        f.write(f"{os.getpid()}\n")
    threading.Event().wait()


def connect(hostport):
    host, port = hostport.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def rtt(hostport, count):
    with connect(hostport) as s:
        samples = []
        for i in range(count + 2):          # two warm-up rounds
            t0 = time.monotonic()
            s.sendall(b"x")
            if s.recv(1) != b"x":
                sys.exit("echo server answered something else")
            if i >= 2:
                samples.append((time.monotonic() - t0) * 1000)
    xs, n = sorted(samples), len(samples)
    print(f"{statistics.median(xs):.2f} {xs[0]:.2f} {xs[-1]:.2f} "
          f"{xs[n // 10]:.2f} {xs[n * 9 // 10]:.2f}")


def send(hostport, nbytes):
    with connect(hostport) as s:
        for b in stream(nbytes):
            s.sendall(b)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):
            b = s.recv(4096)
            if not b:
                break
            reply += b
    total, sha, mbit = reply.decode().split()
    ok = int(total) == nbytes and sha == expected_sha(nbytes)
    print(f"{float(mbit):.2f} {'sha-ok' if ok else f'MISMATCH bytes={total}'}")


def recv(hostport, nbytes):
    with connect(hostport) as s:
        total, sha, mbit = receive_all(s)
    ok = total == nbytes and sha == expected_sha(nbytes)
    print(f"{mbit:.2f} {'sha-ok' if ok else f'MISMATCH bytes={total}'}")


if __name__ == "__main__":
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "serve":
        serve(rest)
    elif cmd == "rtt":
        rtt(rest[0], int(rest[1]))
    elif cmd == "send":
        send(rest[0], int(rest[1]))
    elif cmd == "recv":
        recv(rest[0], int(rest[1]))
    else:
        sys.exit(f"unknown command {cmd}")
EOF

# in-SITE --pidfile F CMD...: start_server puts --pidfile first; move it last.
for site in src dst; do
  cat >"$TESTDIR/in-$site" <<EOF
#!/usr/bin/env bash
opt=\$1 file=\$2; shift 2
exec "$WAN_EMU" --name "$name" exec $site "\$@" "\$opt" "\$file"
EOF
  chmod +x "$TESTDIR/in-$site"
done

# Whether PID is a live wan-relay (the relays are not children of this shell).
relay_running ()
{
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && grep -q wan-relay "/proc/$1/cmdline" 2>/dev/null
}

# within VALUE WANT PCT ABS: |VALUE - WANT| <= WANT*PCT/100 + ABS
within ()
{
  awk -v v="$1" -v w="$2" -v p="$3" -v a="$4" \
    'BEGIN { d = v - w; if (d < 0) d = -d; exit !(d <= w * p / 100 + a) }'
}

# ---------------------------------------------------------------- up
out=$(wan up --rtt 40ms --rate 100mbit --forward "$ECHO_PORT,$SINK_PORT,$SOURCE_PORT" 2>&1) ||
  fail "wan-emu up failed: $out"
echo "$out"
mode=$(sed -n 's/^wan-emu: mode \([a-z]*\).*/\1/p' <<<"$out")
case $mode in
  netem|relay) ;;
  *) fail "wan-emu up did not say which mode it used: $out" ;;
esac
ip netns list | grep -qw "xnbd-$name-src" || fail "namespace xnbd-$name-src missing"
ip netns list | grep -qw "xnbd-$name-dst" || fail "namespace xnbd-$name-dst missing"
src_addr=$(wan addr src)
[ "$src_addr" = 10.254.0.1 ] || fail "wan-emu addr src: '$src_addr'"
if wan up --rtt 10ms >/dev/null 2>&1; then fail "a second 'up' of $name succeeded"; fi
wan status

start_server "$TESTDIR/in-src" python3 "$probe" serve --addr "$src_addr" \
  --echo "$ECHO_PORT" --sink "$SINK_PORT" --source "$SOURCE_PORT" --bytes "$BYTES"
probe_pids+=("$SERVER_PID")

# ---------------------------------------------------------------- RTT
read -r rtt rtt_min rtt_max _ < <(wan exec dst python3 "$probe" rtt "$(wan relay-addr "$ECHO_PORT")" 20)
echo "TCP RTT dst->src: median $rtt ms (min $rtt_min, max $rtt_max), want 40 ms"
within "$rtt" 40 10 1 || fail "median RTT $rtt ms is not 40 ms +-10% + 1 ms"

# ---------------------------------------------------------------- rate
# tbf shapes whole frames: 1448 payload bytes per 1514-byte frame (TCP
# timestamps, 1500 MTU), so 100 Mbit/s on the wire is 95.6 Mbit/s of data.
goodput=$(awk 'BEGIN { printf "%.1f", 100 * 1448 / 1514 }')
read -r down_mbit down_ok < <(wan exec dst python3 "$probe" recv "$(wan relay-addr "$SOURCE_PORT")" "$BYTES")
echo "src->dst: $BYTES bytes at $down_mbit Mbit/s of data ($down_ok), want $goodput (100 on the wire)"
[ "$down_ok" = sha-ok ] || fail "src->dst data differ: $down_ok"
within "$down_mbit" "$goodput" 10 0 ||
  fail "src->dst data rate $down_mbit Mbit/s is not $goodput +-10% (100 Mbit/s on the wire)"

read -r up_mbit up_ok < <(wan exec dst python3 "$probe" send "$(wan relay-addr "$SINK_PORT")" "$BYTES")
echo "dst->src: $BYTES bytes at $up_mbit Mbit/s of data ($up_ok), want $goodput (100 on the wire)"
[ "$up_ok" = sha-ok ] || fail "dst->src data differ: $up_ok"
within "$up_mbit" "$goodput" 10 0 ||
  fail "dst->src data rate $up_mbit Mbit/s is not $goodput +-10% (100 Mbit/s on the wire)"

# ---------------------------------------------------------------- relay models
# Inside src, over its own addresses: a relay with 10 ms one way and
# 100% loss holds every chunk one more RTT (2*10+1 ms): RTT 2*(10+21) = 62.
start_server "$TESTDIR/in-src" "$XNBD_BUILD/wan-relay" --listen 127.0.0.1:6001 \
  --connect "$src_addr:$ECHO_PORT" --delay 10 --loss 100% --seed 1 --rt-priority 10
probe_pids+=("$SERVER_PID")
read -r lrtt lmin lmax _ < <(wan exec src python3 "$probe" rtt 127.0.0.1:6001 10)
echo "relay, delay 10 ms, loss 100%: RTT median $lrtt ms (min $lmin, max $lmax), want 62"
within "$lrtt" 62 10 1 || fail "loss model: RTT $lrtt ms, expected 62 ms"
# Jitter 5 ms on a 10 ms delay: each RTT in [10, 30] ms, and not constant.
start_server "$TESTDIR/in-src" "$XNBD_BUILD/wan-relay" --listen 127.0.0.1:6002 \
  --connect "$src_addr:$ECHO_PORT" --delay 10 --jitter 5 --seed 1 --rt-priority 10
probe_pids+=("$SERVER_PID")
# Percentiles, not extremes: the probes themselves are not real-time.
read -r jrtt jmin jmax jp10 jp90 < <(wan exec src python3 "$probe" rtt 127.0.0.1:6002 40)
echo "relay, delay 10 ms, jitter 5 ms: RTT median $jrtt ms (min $jmin, max $jmax," \
     "p10 $jp10, p90 $jp90), want 10..30"
awk -v lo="$jp10" -v hi="$jp90" -v min="$jmin" \
    'BEGIN { exit !(min >= 9.5 && lo >= 10 && hi <= 31 && hi - lo >= 3) }' ||
  fail "jitter model: RTT p10 $jp10 ms, p90 $jp90 ms, min $jmin ms; expected a spread within 10..30 ms"

# ---------------------------------------------------------------- down
relay_pids=()
for f in "$WAN_EMU_STATE/$name"/relay-*.pid; do
  if [ -f "$f" ]; then relay_pids+=("$(cat "$f")"); fi
done
[ "$mode" = netem ] || [ "${#relay_pids[@]}" -eq 3 ] ||
  fail "relay mode but ${#relay_pids[@]} relay pidfiles (expected 3)"
for pid in "${relay_pids[@]}"; do
  relay_running "$pid" || fail "relay $pid died early"
done

stop_probes
wan down
if ip netns list | grep -qw "xnbd-$name"; then fail "namespaces left after down: $(ip netns list)"; fi
for pid in "${relay_pids[@]}"; do
  if relay_running "$pid"; then fail "relay $pid still running after down"; fi
done
[ ! -e "$WAN_EMU_STATE/$name" ] || fail "state $WAN_EMU_STATE/$name left after down"
[ "$(wan down)" = "wan-emu: '$name' is not up" ] || fail "second down was not a no-op"
echo OK
