#!/usr/bin/env python3
"""bad-source.py: a read-only NBD server that can misbehave on purpose, for
fault tests of xnbd-proxy against a hostile or broken source.

usage: bad-source.py (--unix PATH | --port-file FILE) [--pidfile FILE]
                     [--counters FILE] [--export NAME] [--misbehave MODE[:PARAMS]]
                     IMAGE

Serves IMAGE (read-only) over fixed-newstyle NBD: NBD_OPT_EXPORT_NAME, INFO,
GO, LIST, ABORT, STRUCTURED_REPLY, LIST/SET_META_CONTEXT (base:allocation);
commands READ (simple, or structured with OFFSET_DATA/OFFSET_HOLE chunks),
BLOCK_STATUS (the file's real holes, from SEEK_DATA/SEEK_HOLE), DISC; every
other command gets EPERM (writes) or EINVAL.  Without --misbehave it is a
correct server.  --port-file listens on 127.0.0.1 (an ephemeral port, written
to FILE); --unix on a unix socket.  The pidfile is written once listening.
SIGTERM: stop, write the counters a last time, exit 0.

MODE (what a request that the fault applies to gets):
  bs-extra-extent   block status: the right extents, then one more extent of
                    extra=LEN bytes (default 8 MiB) flagged hole+zero, past
                    the request (past the export at its end)
  bs-huge-extent    block status: the right extents, but the last one is
                    stretched to 0xFFFFF000 bytes (a hole stays a hole)
  bs-zero-length    block status: one extent of length 0 (hole+zero)
  stall-mid-reply   read: the reply header and half the data, then silence
                    on that connection (it stays open; later requests on it
                    are read and ignored)
  never-reply       read: no reply, then silence on that connection
  wrong-handle      read: a correct reply carrying another request's handle
  chunk-outside     read (structured replies only): first an OFFSET_DATA
                    chunk for the bytes just past the requested range, then
                    the correct reply
  close-mid-reply   read: the reply header and half the data, then the
                    connection is closed

PARAMS, comma-separated KEY=VALUE (sizes take K/M/G suffixes):
  nth=N      the first N-1 requests of the mode's type (read or block
             status) that match off/len are served correctly (default 1)
  count=K    at most K requests misbehave, 0 = no limit (default 0)
  off=O,len=L  only requests that overlap [O, O+L) count (default: all)
  for=S      misbehave only during the first S seconds after start
  until=FILE misbehave only while FILE does not exist (the test "fixes"
             the source by creating it)
  extra=LEN  bs-extra-extent's extra extent (default 8M)

--counters FILE: JSON rewritten (atomically, at most every 0.1 s and at
exit) with {"connections": accepted, "open": now open, "requests": {"read",
"block_status", "disc", "other"}, "misbehaved": N, "mode": MODE}."""

import argparse
import errno
import json
import os
import signal
import socket
import struct
import sys
import threading
import time

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCT_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
CFLAG_NO_ZEROES = 2
TF_HAS_FLAGS, TF_READ_ONLY, TF_CAN_MULTI_CONN = 1, 2, 1 << 8

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST = 1, 2, 3
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 9, 10

REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_BLOCK_STATUS = 0, 1, 2, 7
CMD_FLAG_REQ_ONE = 8
CHUNK_DONE = 1
CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE, CHUNK_BLOCK_STATUS = 1, 2, 5
STATE_HOLE, STATE_ZERO = 1, 2
BASE_ALLOCATION = b"base:allocation"
CTX_ID = 1

MAX_REQUEST = 32 << 20
MAX_CONNECTIONS = 64
READ_MODES = ("stall-mid-reply", "never-reply", "wrong-handle", "chunk-outside",
              "close-mid-reply")
BS_MODES = ("bs-extra-extent", "bs-huge-extent", "bs-zero-length")


class Closed(Exception):
    """The peer went away or the server is stopping."""


def parse_size(s):
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = s.strip().lower()
    if s.endswith("ib"):
        s = s[:-2]
    if s and s[-1] in mult:
        return int(s[:-1], 0) * mult[s[-1]]
    return int(s, 0)


class Fault:
    """Which requests misbehave, from --misbehave MODE[:PARAMS]."""

    def __init__(self, spec):
        self.mode, self.p = None, {}
        self.lock = threading.Lock()
        self.seen = 0
        self.done = 0
        self.start = time.monotonic()
        if not spec:
            return
        mode, _, params = spec.partition(":")
        if mode not in READ_MODES + BS_MODES:
            sys.exit("bad-source: unknown --misbehave mode '%s' (one of: %s)"
                     % (mode, ", ".join(READ_MODES + BS_MODES)))
        self.mode = mode
        for kv in filter(None, params.split(",")):
            k, sep, v = kv.partition("=")
            if not sep or k not in ("nth", "count", "off", "len", "for", "until", "extra"):
                sys.exit("bad-source: bad --misbehave parameter '%s' (expected "
                         "nth=, count=, off=, len=, for=, until= or extra=)" % kv)
            try:
                self.p[k] = v if k == "until" else float(v) if k == "for" else parse_size(v)
            except ValueError:
                sys.exit("bad-source: --misbehave %s=%s: not a number" % (k, v))
        self.nth = self.p.get("nth", 1)
        self.count = self.p.get("count", 0)
        self.extra = self.p.get("extra", 8 << 20)

    def active(self):
        if "for" in self.p and time.monotonic() - self.start >= self.p["for"]:
            return False
        if "until" in self.p and os.path.exists(self.p["until"]):
            return False
        return True

    def applies(self, kind, off, length):
        """kind is "read" or "bs"; whether this request misbehaves."""
        if self.mode is None or (kind == "read") != (self.mode in READ_MODES):
            return False
        if "off" in self.p:
            lo, hi = self.p["off"], self.p["off"] + self.p.get("len", 1)
            if off + max(length, 1) <= lo or off >= hi:
                return False
        with self.lock:
            self.seen += 1
            if self.seen < self.nth or (self.count and self.done >= self.count):
                return False
            if not self.active():
                return False
            self.done += 1
        COUNTERS.bump("misbehaved")
        return True


class Counters:
    def __init__(self, path, mode):
        self.path = path
        self.lock = threading.Lock()
        self.c = {"connections": 0, "open": 0, "misbehaved": 0, "mode": mode or "none",
                  "requests": {"read": 0, "block_status": 0, "disc": 0, "other": 0}}
        self.dirty = True

    def bump(self, key, sub=None, n=1):
        with self.lock:
            if sub:
                self.c[key][sub] += n
            else:
                self.c[key] += n
            self.dirty = True

    def write(self):
        if not self.path:
            return
        with self.lock:
            if not self.dirty:
                return
            data = json.dumps(self.c, sort_keys=True)
            self.dirty = False
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.write(data + "\n")
        os.replace(tmp, self.path)


STOP = threading.Event()
COUNTERS = None


class Conn:
    def __init__(self, sock, img, export, fault):
        self.s, self.img, self.export, self.fault = sock, img, export, fault
        self.size = os.fstat(img).st_size
        self.structured = False
        self.meta = False
        self.no_zeroes = False

    # ---- socket helpers: every wait wakes up to notice a stop
    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            if STOP.is_set():
                raise Closed()
            try:
                chunk = self.s.recv(n - len(buf))
            except socket.timeout:
                continue
            except OSError:
                raise Closed()
            if not chunk:
                raise Closed()
            buf += chunk
        return bytes(buf)

    def send(self, data):
        view = memoryview(data)
        while view:
            if STOP.is_set():
                raise Closed()
            try:
                n = self.s.send(view)
            except socket.timeout:
                continue
            except OSError:
                raise Closed()
            view = view[n:]

    def go_silent(self):
        """Sends nothing more; reads and drops whatever comes until the peer
        closes or the server stops."""
        while not STOP.is_set():
            try:
                if not self.s.recv(65536):
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        raise Closed()

    # ---- negotiation
    def opt_reply(self, opt, rtype, data=b""):
        self.send(struct.pack(">QIII", REPLY_MAGIC, opt, rtype, len(data)) + data)

    def info_export(self):
        flags = TF_HAS_FLAGS | TF_READ_ONLY | TF_CAN_MULTI_CONN
        return struct.pack(">HQH", INFO_EXPORT, self.size, flags)

    def negotiate(self):
        self.send(NBDMAGIC + struct.pack(">QH", IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", self.recv_exact(4))
        self.no_zeroes = bool(cflags & CFLAG_NO_ZEROES)
        for _ in range(64):                      # bounded: a client may not loop
            magic, opt, length = struct.unpack(">QII", self.recv_exact(16))
            if magic != IHAVEOPT:
                raise Closed()
            if length > 65536:
                raise Closed()
            data = self.recv_exact(length)
            if opt == OPT_EXPORT_NAME:
                if data.decode("utf-8", "replace") != self.export:
                    raise Closed()
                flags = TF_HAS_FLAGS | TF_READ_ONLY | TF_CAN_MULTI_CONN
                self.send(struct.pack(">QH", self.size, flags) +
                          (b"" if self.no_zeroes else bytes(124)))
                return True
            if opt == OPT_ABORT:
                self.opt_reply(opt, REP_ACK)
                return False
            if opt == OPT_LIST:
                name = self.export.encode()
                self.opt_reply(opt, REP_SERVER, struct.pack(">I", len(name)) + name)
                self.opt_reply(opt, REP_ACK)
            elif opt in (OPT_INFO, OPT_GO):
                if len(data) < 6:
                    self.opt_reply(opt, REP_ERR_INVALID)
                    continue
                (nlen,) = struct.unpack(">I", data[:4])
                if 4 + nlen + 2 > len(data):
                    self.opt_reply(opt, REP_ERR_INVALID)
                    continue
                if data[4:4 + nlen].decode("utf-8", "replace") != self.export:
                    self.opt_reply(opt, REP_ERR_UNKNOWN, b"no such export")
                    continue
                self.opt_reply(opt, REP_INFO, self.info_export())
                self.opt_reply(opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1,
                                                          4096, MAX_REQUEST))
                self.opt_reply(opt, REP_ACK)
                if opt == OPT_GO:
                    return True
            elif opt == OPT_STRUCTURED_REPLY:
                if length:
                    self.opt_reply(opt, REP_ERR_INVALID)
                else:
                    self.structured = True
                    self.opt_reply(opt, REP_ACK)
            elif opt in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                if opt == OPT_SET_META_CONTEXT and not self.structured:
                    self.opt_reply(opt, REP_ERR_INVALID)
                    continue
                try:
                    (nlen,) = struct.unpack(">I", data[:4])
                    pos = 4 + nlen
                    (nq,) = struct.unpack(">I", data[pos:pos + 4])
                    pos += 4
                    queries = []
                    for _ in range(nq):
                        (ql,) = struct.unpack(">I", data[pos:pos + 4])
                        queries.append(data[pos + 4:pos + 4 + ql])
                        pos += 4 + ql
                except struct.error:
                    self.opt_reply(opt, REP_ERR_INVALID)
                    continue
                want = (not queries and opt == OPT_LIST_META_CONTEXT) or \
                    any(q in (BASE_ALLOCATION, b"base:") for q in queries)
                if want:
                    self.opt_reply(opt, REP_META_CONTEXT,
                                   struct.pack(">I", CTX_ID) + BASE_ALLOCATION)
                if opt == OPT_SET_META_CONTEXT:
                    self.meta = want
                self.opt_reply(opt, REP_ACK)
            else:
                self.opt_reply(opt, REP_ERR_UNSUP)
        return False

    # ---- the image
    def extents(self, off, length):
        """[(len, flags)] exactly covering [off, off + length)."""
        out, pos, end = [], off, off + length
        while pos < end:
            try:
                data = os.lseek(self.img, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = end
            if data > pos:
                n = min(data, end) - pos
                out.append((n, STATE_HOLE | STATE_ZERO))
                pos += n
                continue
            hole = os.lseek(self.img, pos, os.SEEK_HOLE)
            n = min(hole, end) - pos
            out.append((n, 0))
            pos += n
        return out

    # ---- replies
    def simple(self, handle, err, data=b""):
        self.send(struct.pack(">IIQ", SIMPLE_MAGIC, err, handle) + data)

    def chunk(self, flags, ctype, handle, payload):
        self.send(struct.pack(">IHHQI", STRUCT_MAGIC, flags, ctype, handle, len(payload))
                  + payload)

    def error(self, handle, err, msg=b""):
        if self.structured:
            self.chunk(CHUNK_DONE, (1 << 15) + 1, handle,
                       struct.pack(">IH", err, len(msg)) + msg)
        else:
            self.simple(handle, err)

    def half_reply(self, handle, off, length):
        """A reply header claiming `length` bytes and half of them."""
        data = os.pread(self.img, length, off)
        if self.structured:
            self.send(struct.pack(">IHHQIQ", STRUCT_MAGIC, CHUNK_DONE, CHUNK_OFFSET_DATA,
                                  handle, 8 + length, off) + data[:length // 2])
        else:
            self.send(struct.pack(">IIQ", SIMPLE_MAGIC, 0, handle) + data[:length // 2])

    def read(self, handle, off, length):
        mode = self.fault.mode if self.fault.applies("read", off, length) else None
        if mode == "never-reply":
            self.go_silent()
        if mode in ("stall-mid-reply", "close-mid-reply"):
            self.half_reply(handle, off, length)
            if mode == "close-mid-reply":
                raise Closed()
            self.go_silent()
        if mode == "wrong-handle":
            handle ^= 0x5A5A5A5A5A5A5A5A
        if not self.structured:
            self.simple(handle, 0, os.pread(self.img, length, off))
            return
        if mode == "chunk-outside":
            n = min(length, 4096)
            self.chunk(0, CHUNK_OFFSET_DATA, handle,
                       struct.pack(">Q", off + length) + bytes(n))
        exts = self.extents(off, length)
        pos = off
        for i, (n, flags) in enumerate(exts):
            last = CHUNK_DONE if i == len(exts) - 1 else 0
            if flags & STATE_ZERO:
                self.chunk(last, CHUNK_OFFSET_HOLE, handle, struct.pack(">QI", pos, n))
            else:
                self.chunk(last, CHUNK_OFFSET_DATA, handle,
                           struct.pack(">Q", pos) + os.pread(self.img, n, pos))
            pos += n

    def block_status(self, handle, cflags, off, length):
        if not self.meta:
            self.error(handle, errno.EINVAL, b"no meta context negotiated")
            return
        exts = self.extents(off, length)
        if cflags & CMD_FLAG_REQ_ONE:
            exts = exts[:1]
        if self.fault.applies("bs", off, length):
            if self.fault.mode == "bs-extra-extent":
                exts.append((self.fault.extra, STATE_HOLE | STATE_ZERO))
            elif self.fault.mode == "bs-huge-extent":
                exts[-1] = (0xFFFFF000, exts[-1][1])
            elif self.fault.mode == "bs-zero-length":
                exts = [(0, STATE_HOLE | STATE_ZERO)]
        payload = struct.pack(">I", CTX_ID) + b"".join(struct.pack(">II", n, f)
                                                       for n, f in exts)
        self.chunk(CHUNK_DONE, CHUNK_BLOCK_STATUS, handle, payload)

    def serve(self):
        while True:
            magic, cflags, ctype, handle, off, length = \
                struct.unpack(">IHHQQI", self.recv_exact(28))
            if magic != REQUEST_MAGIC:
                return
            if ctype == CMD_DISC:
                COUNTERS.bump("requests", "disc")
                return
            if ctype == CMD_WRITE:
                COUNTERS.bump("requests", "other")
                if length > MAX_REQUEST:
                    return
                self.recv_exact(length)
                self.error(handle, errno.EPERM, b"read-only export")
                continue
            kind = {CMD_READ: "read", CMD_BLOCK_STATUS: "block_status"}.get(ctype, "other")
            COUNTERS.bump("requests", kind)
            if kind == "other":
                self.error(handle, errno.EINVAL, b"unsupported command")
            elif not length or off + length > self.size or \
                    (kind == "read" and length > MAX_REQUEST):
                self.error(handle, errno.EINVAL, b"request out of range")
            elif kind == "read":
                self.read(handle, off, length)
            elif not self.structured:
                self.simple(handle, errno.EINVAL)
            else:
                self.block_status(handle, cflags, off, length)


def handle_conn(sock, img, export, fault):
    try:
        sock.settimeout(0.5)
        c = Conn(sock, img, export, fault)
        if c.negotiate():
            c.serve()
    except Closed:
        pass
    except Exception as e:                   # report, keep serving others
        sys.stderr.write("bad-source: connection error: %r\n" % (e,))
    finally:
        try:
            sock.close()
        finally:
            COUNTERS.bump("open", n=-1)


def main():
    global COUNTERS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", metavar="PATH")
    where.add_argument("--port-file", metavar="FILE")
    ap.add_argument("--pidfile")
    ap.add_argument("--counters")
    ap.add_argument("--export", default="")
    ap.add_argument("--misbehave", metavar="MODE[:PARAMS]")
    ap.add_argument("image")
    a = ap.parse_args()

    fault = Fault(a.misbehave)
    COUNTERS = Counters(a.counters, fault.mode)
    try:
        img = os.open(a.image, os.O_RDONLY)
    except OSError as e:
        sys.exit("bad-source: cannot open %s: %s" % (a.image, e.strerror))

    if a.unix:
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(a.unix)
        except FileNotFoundError:
            pass
        ls.bind(a.unix)
    else:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    ls.settimeout(0.1)
    if a.port_file:
        with open(a.port_file + ".tmp", "w") as f:
            f.write("%d\n" % ls.getsockname()[1])
        os.replace(a.port_file + ".tmp", a.port_file)

    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    signal.signal(signal.SIGINT, lambda *_: STOP.set())
    COUNTERS.write()
    if a.pidfile:
        with open(a.pidfile + ".tmp", "w") as f:
            f.write("%d\n" % os.getpid())
        os.replace(a.pidfile + ".tmp", a.pidfile)
    sys.stderr.write("bad-source: serving %s (%d bytes), misbehaving: %s\n"
                     % (a.image, os.fstat(img).st_size, a.misbehave or "no"))

    last_write = 0.0
    threads = []
    while not STOP.is_set():
        try:
            s, _ = ls.accept()
        except socket.timeout:
            s = None
        if s is not None:
            threads = [t for t in threads if t.is_alive()]
            COUNTERS.bump("connections")
            if len(threads) >= MAX_CONNECTIONS:
                s.close()
            else:
                COUNTERS.bump("open")
                t = threading.Thread(target=handle_conn, args=(s, img, a.export, fault),
                                     daemon=True)
                t.start()
                threads.append(t)
        now = time.monotonic()
        if now - last_write >= 0.1:
            COUNTERS.write()
            last_write = now

    ls.close()
    if a.unix:
        try:
            os.unlink(a.unix)
        except OSError:
            pass
    for t in threads:
        t.join(2)
    COUNTERS.write()
    if a.pidfile:
        try:
            os.unlink(a.pidfile)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
