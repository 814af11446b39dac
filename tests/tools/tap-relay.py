#!/usr/bin/env python3
"""tap-relay.py LISTEN_PORTFILE TARGET_HOST TARGET_PORT CAPTURE
(TARGET_HOST starting with / is a unix socket path; TARGET_PORT is then ignored.)

A TCP relay on 127.0.0.1 (an ephemeral port, written to LISTEN_PORTFILE)
that forwards every connection to TARGET and appends every byte it
forwards, both directions, to CAPTURE: what an eavesdropper on the link
would see.  Runs until killed."""
import os, selectors, socket, sys

portfile, host, port, capture = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(16)
with open(portfile + ".tmp", "w") as f:
    f.write("%d\n" % ls.getsockname()[1])
os.rename(portfile + ".tmp", portfile)
cap = open(capture, "ab", buffering=0)
sel = selectors.DefaultSelector()
sel.register(ls, selectors.EVENT_READ)
peer = {}
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is ls:
            c, _ = ls.accept()
            if host.startswith("/"):
                t = socket.socket(socket.AF_UNIX)
                t.connect(host)
            else:
                t = socket.create_connection((host, port))
            peer[c], peer[t] = t, c
            sel.register(c, selectors.EVENT_READ)
            sel.register(t, selectors.EVENT_READ)
            continue
        try:
            data = s.recv(1 << 16)
        except OSError:
            data = b""
        o = peer.get(s)
        if not data or o is None:
            for x in (s, o):
                if x is not None and x in peer:
                    sel.unregister(x)
                    peer.pop(x, None)
                    x.close()
            continue
        cap.write(data)
        try:
            o.sendall(data)
        except OSError:
            # The other end went away (reset): end this pair, keep relaying
            # the others (one broken connection must not stop the tap).
            for x in (s, o):
                if x in peer:
                    sel.unregister(x)
                    peer.pop(x, None)
                    x.close()
