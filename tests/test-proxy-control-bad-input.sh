#!/usr/bin/env bash
# The control socket (mode 0600) answers every bad line with exactly one
# {"ok":false,"error":"..."} line: garbage, unknown commands, missing or bad
# arguments, a 10000-byte line, binary bytes (NUL, control characters,
# invalid UTF-8), also pipelined on one connection.  A connection stays
# usable after an ordinary error.  An endless line without a newline and an
# abrupt close do no harm.  Afterwards the proxy still serves correctly.
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img python3

M=$((1024 * 1024))
src=$TESTDIR/src.img model=$TESTDIR/model.img
make_image "$src" 16M 9
cp --sparse=always "$src" "$model"
ssock=$TESTDIR/src.sock psock=$TESTDIR/proxy.sock ctlsock=$TESTDIR/ctl
uri=$(nbd_unix_uri "$psock")
start_server xnbd-server -r -u "$ssock" "$src"
start_proxy --target "$(nbd_unix_uri "$ssock")" --cache "$TESTDIR/cache.img" \
  --bitmap "$TESTDIR/cache.bitmap" --control "$ctlsock" -u "$psock"
wait_state "$ctlsock" proxying 30

mode=$(stat -c %a "$ctlsock")
[ "$mode" = 600 ] || fail "the control socket has mode $mode, expected 600"

python3 - "$ctlsock" <<'PYEOF'
import json, socket, sys, time
path = sys.argv[1]
problems = []

def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s

def readline(s, buf):
    """One line (without \n) and the rest of the buffer; None at EOF."""
    deadline = time.monotonic() + 5
    while b"\n" not in buf:
        if time.monotonic() > deadline:
            raise TimeoutError("no reply within 5 s")
        chunk = s.recv(65536)
        if not chunk:
            return None, buf
        buf += chunk
    line, rest = buf.split(b"\n", 1)
    return line, rest

def check_error(name, line):
    if line is None:
        problems.append("%s: connection closed without a reply" % name)
        return False
    try:
        j = json.loads(line)
    except ValueError as e:
        problems.append("%s: reply is not one JSON line (%s): %r" % (name, e, line[:200]))
        return False
    if j.get("ok") is not False or not isinstance(j.get("error"), str) or not j["error"]:
        problems.append("%s: expected {\"ok\":false,\"error\":...}, got %r" % (name, line[:200]))
        return False
    print("%-22s -> %s" % (name, j["error"][:150]))
    return True

bad = [
    ("garbage", b"garbage !@#$%^&*() ]]"),
    ("unknown command", b"xyzzy"),
    ("rate no argument", b"rate"),
    ("rate abc", b"rate abc"),
    ("rate negative", b"rate -5"),
    ("rate bad unit", b"rate 10parsecs"),
    ("status extra arg", b"status now please"),
    ("detach bad option", b"detach --bogus"),
    ("reconnect no arg", b"reconnect"),
    ("json instead", b'{"command":"status"}'),
    ("10000-byte line", b"A" * 10000),
    ("NUL bytes", b"sta\x00tus"),
    ("control chars", b"\x01\x02\x03\x1b[2J\x7f"),
    ("invalid UTF-8", b"\xff\xfe\xfd\xc3\x28"),
    ("all bytes", bytes(b for b in range(256) if b != 10)),
]
# Ordinary errors must leave the connection usable.
may_close = {"10000-byte line", "NUL bytes", "control chars", "invalid UTF-8", "all bytes"}

for name, data in bad:
    s = conn()
    s.sendall(data + b"\n")
    line, buf = readline(s, b"")
    if check_error(name, line):
        # Exactly one reply: the next line answers the next command.
        try:
            s.sendall(b"status\n")
            line, buf = readline(s, buf)
        except (BrokenPipeError, ConnectionResetError):
            line = None
        if line is None:
            if name not in may_close:
                problems.append("%s: the connection was closed after the error" % name)
        else:
            try:
                j = json.loads(line)
            except ValueError:
                j = {}
            if j.get("ok") is not True or "state" not in j:
                problems.append("%s: after the error reply, 'status' got %r (more than one reply?)"
                                % (name, line[:200]))
    s.close()

# The ordinary ones pipelined on one connection: one reply each, in order.
s = conn()
ordinary = [d for n, d in bad if n not in may_close]
s.sendall(b"".join(d + b"\n" for d in ordinary) + b"status\n")
buf = b""
for i, d in enumerate(ordinary):
    line, buf = readline(s, buf)
    check_error("pipelined #%d" % i, line)
line, buf = readline(s, buf)
if line is None or json.loads(line).get("ok") is not True:
    problems.append("pipelined: the final status got %r" % (line,))
s.close()

# An endless line without a newline: an error reply or a close, then the
# proxy goes on (checked below).  Then a connection closed mid-line.
s = conn()
try:
    for _ in range(64):
        s.sendall(b"B" * 16384)
except (BrokenPipeError, ConnectionResetError):
    pass
try:
    line, _ = readline(s, b"")
    if line is not None:
        check_error("endless line", line)
except (TimeoutError, socket.timeout):
    problems.append("endless line: neither a reply nor a close within 5 s")
except ConnectionResetError:
    pass
s.close()
s = conn()
s.sendall(b"stat")
s.close()

if problems:
    for p in problems:
        print("FAIL: " + p, file=sys.stderr)
    sys.exit(1)
PYEOF

# The proxy still serves and still answers.
assert_alive "$PROXY_PID"
ctl_ok "$ctlsock" status >/dev/null
w=("write -P 0x5e $((3 * M + 1)) 4097" "write -z $((8 * M)) 64k")
qio "$uri" "${w[@]}"
qio "$model" "${w[@]}"
qemu-img compare -f raw -F raw "$model" "$uri" || fail "the proxy's disk differs from the model"
ctl_ok "$ctlsock" cache-all >/dev/null
wait_state "$ctlsock" complete 60
qemu-img compare -f raw -F raw "$model" "$uri" || fail "after cache-all the disk differs from the model"
echo OK
