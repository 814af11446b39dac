#!/usr/bin/env python3
"""console-stamp.py SOCKET OUT [SECONDS]

Reads a QEMU serial console from the unix socket SOCKET (QEMU's
-chardev socket,id=con,path=SOCKET,server=on,wait=on -serial chardev:con)
and appends each line to OUT prefixed with the host's clock when it
arrived (seconds since the epoch, microseconds: "1700000000.123456 "), so
that lines from two sites (two QEMUs on one host) can be merged and the
gaps in the guest's output measured on one clock: the guest's own clock
stops while its VM is stopped, the host's does not.

Waits at most SECONDS (default 60) for SOCKET to appear; then runs until
QEMU closes the console.  Exit 1 if SOCKET never appeared or refused."""
import os
import socket
import sys
import time


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: console-stamp.py SOCKET OUT [SECONDS]")
    path, out = sys.argv[1], sys.argv[2]
    secs = float(sys.argv[3]) if len(sys.argv) == 4 else 60.0
    deadline = time.monotonic() + secs
    s = socket.socket(socket.AF_UNIX)
    while True:
        try:
            s.connect(path)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                sys.exit("console-stamp.py: cannot connect to %s in %g s: %s" % (path, secs, e))
            time.sleep(0.01)
    buf = b""
    with open(out, "ab", buffering=0) as f:
        while True:
            try:
                chunk = s.recv(65536)
            except OSError:
                chunk = b""
            now = time.time()
            if not chunk:
                if buf:
                    f.write(b"%.6f " % now + buf + b"\n")
                return
            buf += chunk
            *lines, buf = buf.split(b"\n")
            if lines:
                f.write(b"".join(b"%.6f " % now + l.rstrip(b"\r") + b"\n" for l in lines))


main()
