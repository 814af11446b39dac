#!/usr/bin/env python3
"""tap-relay.py LISTEN_PORTFILE TARGET_HOST TARGET_PORT CAPTURE
(TARGET_HOST starting with / is a unix socket path; TARGET_PORT is then ignored.)

A TCP relay on 127.0.0.1 (an ephemeral port, written to LISTEN_PORTFILE)
that forwards every connection to TARGET and appends every byte it
forwards, both directions, to CAPTURE: what an eavesdropper on the link
would see.  Runs until killed.

Non-blocking, with a buffer per direction: a peer that does not read
holds up only its own connection (as on a real network), never the
others -- a relay that blocked on one socket could deadlock two
connections of one client that depend on each other's progress."""
import os, selectors, socket, sys

portfile, host, port, capture = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
MAX_BUF = 1 << 20          # per direction: stop reading while this much waits

ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(16)
with open(portfile + ".tmp", "w") as f:
    f.write("%d\n" % ls.getsockname()[1])
os.rename(portfile + ".tmp", portfile)
cap = open(capture, "ab", buffering=0)
sel = selectors.DefaultSelector()
sel.register(ls, selectors.EVENT_READ)
peer = {}                  # socket -> the socket its data goes to
out = {}                   # socket -> bytes waiting to be sent to it


def update(s):
    """Interest of s: read unless its peer's buffer is full; write if
    something waits for it."""
    if s not in peer:
        return
    ev = 0
    if len(out[peer[s]]) < MAX_BUF:
        ev |= selectors.EVENT_READ
    if out[s]:
        ev |= selectors.EVENT_WRITE
    try:
        if ev:
            sel.modify(s, ev)
        else:
            sel.modify(s, selectors.EVENT_READ)   # (never idle: see closed)
    except KeyError:
        pass


def close_pair(s):
    for x in (s, peer.get(s)):
        if x is not None and x in peer:
            sel.unregister(x)
            peer.pop(x, None)
            out.pop(x, None)
            x.close()


while True:
    for key, ev in sel.select():
        s = key.fileobj
        if s is ls:
            c, _ = ls.accept()
            if host.startswith("/"):
                t = socket.socket(socket.AF_UNIX)
                t.connect(host)
            else:
                t = socket.create_connection((host, port))
            for x in (c, t):
                x.setblocking(False)
            peer[c], peer[t] = t, c
            out[c], out[t] = bytearray(), bytearray()
            sel.register(c, selectors.EVENT_READ)
            sel.register(t, selectors.EVENT_READ)
            continue
        if s not in peer:
            continue
        o = peer[s]
        if ev & selectors.EVENT_WRITE and out[s]:
            try:
                n = s.send(out[s])
                del out[s][:n]
            except BlockingIOError:
                pass
            except OSError:
                close_pair(s)
                continue
        if ev & selectors.EVENT_READ and len(out[o]) < MAX_BUF:
            try:
                data = s.recv(1 << 16)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                # End of s: deliver what waits for its peer, then close.
                try:
                    o.setblocking(True)
                    o.settimeout(5)
                    o.sendall(out[o])
                except OSError:
                    pass
                close_pair(s)
                continue
            if data:
                cap.write(data)
                out[o] += data
        update(s)
        update(o)
