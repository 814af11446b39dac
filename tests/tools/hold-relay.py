#!/usr/bin/env python3
"""hold-relay.py --pidfile F LISTEN TARGET MATCH UNTIL MODE [LOG]

A relay between two unix sockets that holds back one kind of connection:
every connection to LISTEN is forwarded to TARGET, but once the bytes a
client sent on a connection contain MATCH (e.g. the name of an export it
asks for), nothing more from TARGET reaches that client until the file
UNTIL exists.  Then, by MODE:
  release  what was held, and everything after it, is passed on;
  close    the connection is closed (and later ones that match are closed
           as soon as they match): the export looks unreachable.
Connections that never send MATCH are never held.  F (this process's PID)
is written once LISTEN accepts connections.  LOG, if given, gets a line
"held N" when connection N matches and "client-closed N" when its client
closes it (or resets it).  Runs until killed.

Each connection has two threads, one per direction; a thread blocks only
its own connection."""
import os
import socket
import sys
import threading
import time

args = sys.argv[1:]
if len(args) not in (7, 8) or args[0] != "--pidfile":
    sys.exit(__doc__)
pidfile, listen, target, match, until, mode = args[1], args[2], args[3], args[4].encode(), args[5], args[6]
logf = args[7] if len(args) == 8 else None
log_lock = threading.Lock()
counter = [0]


def log(line):
    if logf:
        with log_lock, open(logf, "a") as f:
            f.write(line + "\n")
if mode not in ("release", "close"):
    sys.exit("hold-relay.py: MODE must be release or close, not %r" % mode)


def hold_until_file(matched, dead):
    """Waits (bounded by the test's own timeout) for UNTIL; whether the
    connection may go on."""
    while not os.path.exists(until):
        if dead.is_set():
            return False
        time.sleep(0.02)
    return mode == "release"


def client_to_server(c, s, matched, dead, n):
    seen = b""
    try:
        while True:
            try:
                b = c.recv(65536)
            except OSError:
                b = b""
            if not b:
                if not dead.is_set():
                    log("client-closed %d" % n)
                s.shutdown(socket.SHUT_WR)
                return
            if not matched.is_set():
                seen = (seen + b)[-(len(match) + 65536):]
                if match in seen:
                    matched.set()
                    log("held %d" % n)
            s.sendall(b)
    except OSError:
        pass
    finally:
        dead.set()


def server_to_client(c, s, matched, dead):
    try:
        while True:
            b = s.recv(65536)
            if matched.is_set() and not hold_until_file(matched, dead):
                return
            if not b:
                c.shutdown(socket.SHUT_WR)
                return
            c.sendall(b)
    except OSError:
        pass
    finally:
        dead.set()


def serve(c):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(target)
    except OSError:
        c.close()
        return
    matched, dead = threading.Event(), threading.Event()
    with log_lock:
        counter[0] += 1
        n = counter[0]
    t1 = threading.Thread(target=client_to_server, args=(c, s, matched, dead, n), daemon=True)
    t2 = threading.Thread(target=server_to_client, args=(c, s, matched, dead), daemon=True)
    t1.start()
    t2.start()
    t2.join()
    # The server's side is done (or the connection is to be cut): close
    # both, which also ends t1.
    for x in (c, s):
        try:
            x.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    t1.join()
    c.close()
    s.close()


ls = socket.socket(socket.AF_UNIX)
ls.bind(listen)
ls.listen(16)
with open(pidfile + ".tmp", "w") as f:
    f.write("%d\n" % os.getpid())
os.rename(pidfile + ".tmp", pidfile)
while True:
    conn, _ = ls.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
