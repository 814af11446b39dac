#!/usr/bin/env python3
"""cut-relay.py LISTEN TARGET READY RATE

A relay between two unix sockets, standing for a WAN link that can be cut:
every connection to LISTEN is forwarded to TARGET.  RATE (bytes/s, 0 = no
limit) caps what flows from TARGET back to the clients, all connections
together, so that a copy through the relay takes a while.  READY is
written (with this process's PID) once LISTEN accepts connections.

  SIGUSR1  cut the link: every connection is closed at once, and new ones
           are accepted and closed right away (the peer sees its
           connection drop, as when a route disappears and its TCP
           connections are reset)
  SIGUSR2  restore it: new connections are forwarded again

Runs until killed.  Each connection has two threads, one per direction;
a direction's thread blocks only its own connection."""
import os
import signal
import socket
import sys
import threading
import time

listen, target, ready, rate = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lock = threading.Lock()
conns = set()            # (client, server) socket pairs
cut = False
bucket = {"t": time.monotonic(), "tokens": 0.0}


def throttle(n):
    """Waits until n more bytes may flow back (token bucket, 50 ms burst)."""
    if rate <= 0:
        return
    while True:
        with lock:
            now = time.monotonic()
            b = bucket
            b["tokens"] = min(rate * 0.05, b["tokens"] + (now - b["t"]) * rate)
            b["t"] = now
            if b["tokens"] >= n or b["tokens"] >= rate * 0.05:
                b["tokens"] -= n
                return
            need = (n - b["tokens"]) / rate
        time.sleep(min(need, 0.05))


def close_pair(pair):
    with lock:
        conns.discard(pair)
    for s in pair:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def pump(src, dst, pair, limited):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if limited:
                throttle(len(data))
            dst.sendall(data)
    except OSError:
        pass
    close_pair(pair)


def on_cut(signum, frame):
    global cut
    cut = True
    print("%.3f cut-relay: cut" % time.time(), file=sys.stderr, flush=True)
    with lock:
        pairs = list(conns)
    for p in pairs:
        close_pair(p)


def on_restore(signum, frame):
    global cut
    cut = False
    print("%.3f cut-relay: restored" % time.time(), file=sys.stderr, flush=True)


signal.signal(signal.SIGUSR1, on_cut)
signal.signal(signal.SIGUSR2, on_restore)
ls = socket.socket(socket.AF_UNIX)
try:
    os.unlink(listen)
except FileNotFoundError:
    pass
ls.bind(listen)
ls.listen(64)
with open(ready + ".tmp", "w") as f:
    f.write("%d\n" % os.getpid())
os.rename(ready + ".tmp", ready)
def log(msg):
    print("%.3f cut-relay: %s" % (time.time(), msg), file=sys.stderr, flush=True)


while True:
    c, _ = ls.accept()
    if cut:
        log("link cut: connection refused")
        c.close()
        continue
    log("connection forwarded")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(target)
    except OSError:
        c.close()
        s.close()
        continue
    pair = (c, s)
    with lock:
        conns.add(pair)
    for a, b, limited in ((c, s, False), (s, c, True)):
        threading.Thread(target=pump, args=(a, b, pair, limited), daemon=True).start()
