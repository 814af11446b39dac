#!/usr/bin/env python3
"""qmp.py: a small QMP client for scripts/vm-migrate.

  qmp.py ADDR COMMAND [JSON-ARGUMENTS]
      run one QMP command, print its "return" value as JSON; exit 1 with
      QEMU's error message if it fails
  qmp.py ADDR --wait-migrate STATE[,STATE...] SECONDS
      poll query-migrate (every 10 ms, at most SECONDS) until its status is
      one of STATEs; print the last reply; exit 1 (with the reply) if the
      status became "failed" or "cancelled" or time ran out

  qmp.py --switchover A-ADDR B-ADDR RAM-CTL DISK-CTL URI SECONDS
      vm-migrate's migration and switch-over, in one process so that the
      switch-over takes milliseconds: set A's capabilities x-ignore-shared
      and pause-before-switchover, migrate to URI (B listens there, with
      x-ignore-shared), wait (at most SECONDS) until A's migration pauses
      before the switch-over (A's VM stopped, capability
      pause-before-switchover); check that the RAM proxy (control socket
      RAM-CTL) served no read and took no write so far; activate both
      proxies (A's RAM and disk no longer change); let A finish; wait until
      B has the device state; run the VM at B.  Prints one JSON line: A's
      final query-migrate and "switch_ms" (A seen stopped -> B running).
      Exit 1: failed before B's VM was told to run (the VM can go on at A;
      B's images are to be removed); exit 3: failed after that (the VM is
      B's now).

ADDR: a unix socket path, or HOST:PORT (TCP).  Every reply waits at most
30 s.
"""
import json
import socket
import sys
import time


def die(msg):
    print("qmp.py: " + msg, file=sys.stderr)
    sys.exit(1)


class Qmp:
    def __init__(self, addr):
        self.addr = addr
        try:
            if "/" in addr or ":" not in addr:
                s = socket.socket(socket.AF_UNIX)
                s.settimeout(30)
                s.connect(addr)
            else:
                host, port = addr.rsplit(":", 1)
                s = socket.create_connection((host.strip("[]"), int(port)), timeout=30)
        except (OSError, ValueError) as e:
            die("cannot connect to QMP at %s: %s (is QEMU running with -qmp %s,server=on,wait=off?)"
                % (addr, e, addr if "/" in addr else "tcp:" + addr))
        self.f = s.makefile("rwb")
        greeting = self.read()
        if "QMP" not in greeting:
            die("%s does not speak QMP: %r" % (addr, greeting))
        self.cmd("qmp_capabilities")

    def read(self):
        while True:
            try:
                line = self.f.readline()
            except OSError as e:
                die("QMP at %s: %s" % (self.addr, e))
            if not line:
                die("QMP at %s closed the connection" % self.addr)
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name, args=None):
        req = {"execute": name}
        if args:
            req["arguments"] = args
        self.f.write(json.dumps(req).encode() + b"\n")
        self.f.flush()
        reply = self.read()
        if "error" in reply:
            err = reply["error"]
            die("%s: %s (%s)" % (name, err.get("desc", err), err.get("class", "")))
        return reply.get("return")


def ctl(path, line):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    try:
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                die("control socket %s closed without a reply to %s" % (path, line))
            buf += chunk
    except OSError as e:
        die("control socket %s: %s" % (path, e))
    finally:
        s.close()
    reply = json.loads(buf.split(b"\n", 1)[0])
    if not reply.get("ok"):
        die("%s: %s refused: %s" % (path, line, reply.get("error", reply)))
    return reply


def wait_migrate(q, want, deadline, poll=0.002):
    while True:
        r = q.cmd("query-migrate")
        st = r.get("status", "none")
        if st == want:
            return r
        if st in ("failed", "cancelled") or time.monotonic() > deadline:
            die("%s: migration status %s (%s), waiting for %s"
                % (q.addr, st, r.get("error-desc", "no error given"), want))
        time.sleep(poll)


def switchover(a_addr, b_addr, ram_ctl, disk_ctl, uri, secs):
    a, b = Qmp(a_addr), Qmp(b_addr)
    a.cmd("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-ignore-shared", "state": True},
        {"capability": "pause-before-switchover", "state": True}]})
    a.cmd("migrate", {"uri": uri})
    wait_migrate(a, "pre-switchover", time.monotonic() + secs, 0.005)
    t_stopped = time.monotonic()
    st = ctl(ram_ctl, "status")
    if (st["fetches"]["ondemand"] != 0 or st["bytes"]["local_written"] != 0
            or st.get("standby") is not True):
        die("B touched the RAM file before A's VM stopped (%d on-demand fetches, %d bytes "
            "written, standby %s): B's page cache may hold stale pages"
            % (st["fetches"]["ondemand"], st["bytes"]["local_written"], st.get("standby")))
    # A's VM has stopped and its disk is flushed: its RAM and disk are
    # final.  The proxies keep what they read from now on and start their
    # background copies (digests, older data, seeds) while QEMU sends the
    # device state.  Should the migration still fail, B's VM never ran and
    # vm-migrate removes B's images: nothing kept here is used.
    ctl(ram_ctl, "activate")
    ctl(disk_ctl, "activate")
    a.cmd("migrate-continue", {"state": "pre-switchover"})
    deadline = time.monotonic() + 60
    r = wait_migrate(a, "completed", deadline)
    wait_migrate(b, "completed", deadline)
    try:
        b.cmd("cont")
    except SystemExit:
        sys.exit(3)
    r["switch_ms"] = round((time.monotonic() - t_stopped) * 1000, 1)
    print(json.dumps(r))


def main():
    if len(sys.argv) == 8 and sys.argv[1] == "--switchover":
        switchover(*sys.argv[2:7], float(sys.argv[7]))
        return
    if len(sys.argv) < 3:
        die("usage: qmp.py ADDR COMMAND [JSON-ARGS] | qmp.py ADDR --wait-migrate STATES SECONDS")
    q = Qmp(sys.argv[1])
    if sys.argv[2] == "--wait-migrate":
        if len(sys.argv) != 5:
            die("usage: qmp.py ADDR --wait-migrate STATE[,STATE...] SECONDS")
        want = sys.argv[3].split(",")
        deadline = time.monotonic() + float(sys.argv[4])
        while True:
            r = q.cmd("query-migrate")
            st = r.get("status", "none")
            if st in want:
                print(json.dumps(r))
                return
            if st in ("failed", "cancelled") or time.monotonic() > deadline:
                print(json.dumps(r))
                die("migration status %s (%s), waiting for %s"
                    % (st, r.get("error-desc", "no error given"), sys.argv[3]))
            time.sleep(0.01)
    args = None
    if len(sys.argv) > 3:
        try:
            args = json.loads(sys.argv[3])
        except ValueError as e:
            die("arguments are not JSON: %s" % e)
    print(json.dumps(q.cmd(sys.argv[2], args)))


main()
