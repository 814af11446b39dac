#!/usr/bin/env python3
"""make-seeds.py: writes the seed corpora of the fuzz targets into
tests/fuzz/corpus/NAME/ (committed; rerun after changing this file).

Seeds are small valid conversations, plus a few just-wrong ones, so each
target starts from inputs that reach deep into the parser.  The input
formats are described at the top of each tests/fuzz/fuzz-NAME.c."""
import hashlib
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")

# ---- NBD (fuzz-nbd) --------------------------------------------------
IHAVEOPT = 0x49484156454F5054
REQ_MAGIC = 0x25609513
OPT = dict(EXPORT_NAME=1, ABORT=2, LIST=3, STARTTLS=5, INFO=6, GO=7,
           STRUCTURED_REPLY=8, LIST_META_CONTEXT=9, SET_META_CONTEXT=10)
CMD = dict(READ=0, WRITE=1, DISC=2, FLUSH=3, TRIM=4, CACHE=5,
           WRITE_ZEROES=6, BLOCK_STATUS=7)
F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO = 1, 2, 4, 8, 16
CLIENT_FLAGS = struct.pack(">I", 3)  # FIXED_NEWSTYLE | NO_ZEROES


def opt(name, data=b""):
    return struct.pack(">QII", IHAVEOPT, OPT[name], len(data)) + data


def info_req(name, infos=()):
    n = name.encode()
    return (struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) +
            b"".join(struct.pack(">H", i) for i in infos))


def meta_req(name, queries):
    n = name.encode()
    out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def req(cmd, off=0, length=0, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, CMD[cmd], cookie, off,
                       length) + payload


def nbd_seeds():
    go_all = (opt("STRUCTURED_REPLY") +
              opt("SET_META_CONTEXT", meta_req("", ["base:allocation"])) +
              opt("GO", info_req("", [1, 2, 3])))
    io = (req("READ", 0, 4096, cookie=1) +
          req("READ", 60 * 1024, 8192, cookie=2) +
          req("READ", 60 * 1024, 8192, flags=F_DF, cookie=3) +
          req("WRITE", 64 * 1024 - 512, 1024, flags=F_FUA, cookie=4,
              payload=bytes(range(256)) * 4) +
          req("BLOCK_STATUS", 0, 256 * 1024 + 512, cookie=5) +
          req("BLOCK_STATUS", 4096, 4096, flags=F_REQ_ONE, cookie=6) +
          req("WRITE_ZEROES", 8192, 4096, flags=F_FAST_ZERO, cookie=7) +
          req("WRITE_ZEROES", 12288, 4096, flags=F_NO_HOLE, cookie=8) +
          req("TRIM", 16384, 4096, cookie=9) +
          req("CACHE", 0, 65536, cookie=10) +
          req("FLUSH", cookie=11) +
          req("DISC"))
    yield "structured-io", bytes([0]) + CLIENT_FLAGS + go_all + io
    yield "structured-io-async", bytes([1]) + CLIENT_FLAGS + go_all + io
    yield "structured-io-errors-shutdown", bytes([0x53]) + CLIENT_FLAGS + go_all + io
    yield "export-name-simple", (bytes([1]) + struct.pack(">I", 1) +
                                 opt("EXPORT_NAME") + io)
    yield "list-info-meta-abort", (
        bytes([0]) + CLIENT_FLAGS + opt("LIST") +
        opt("INFO", info_req("ro", [0, 1, 2, 3])) +
        opt("INFO", info_req("nosuch")) +
        opt("LIST_META_CONTEXT", meta_req("", [])) +
        opt("LIST_META_CONTEXT", meta_req("", ["base:", "qemu:dirty-bitmap:x"])) +
        opt("STRUCTURED_REPLY", b"x") + opt("STARTTLS") +
        struct.pack(">QII", IHAVEOPT, 99, 0) + opt("ABORT"))
    yield "readonly-export", (
        bytes([0]) + CLIENT_FLAGS + opt("GO", info_req("ro", [3])) +
        req("READ", 0, 65536 + 1, cookie=1) +
        req("READ", 512, 4096, cookie=2) +
        req("WRITE", 0, 4, cookie=3, payload=b"abcd") +
        req("TRIM", 0, 4096, cookie=4) + req("DISC"))
    yield "oversized-and-bad-ranges", (
        bytes([0]) + CLIENT_FLAGS +
        struct.pack(">QII", IHAVEOPT, OPT["INFO"], 70000) + bytes(70000) +
        opt("GO", info_req("")) +
        req("WRITE", 256 * 1024, 1024, cookie=1, payload=bytes(1024)) +
        req("READ", 0, 0, cookie=2) +
        req("READ", 2**64 - 512, 1024, cookie=3) +
        req("BLOCK_STATUS", 0, 4096, cookie=4) +
        req("WRITE", 0, 100000, cookie=5, payload=bytes(5000)))
    yield "tls-required", (bytes([4]) + CLIENT_FLAGS + opt("LIST") +
                           opt("STARTTLS") + b"\x16\x03\x01\x00\x05hello")
    yield "starttls-unconfigured", (bytes([0]) + CLIENT_FLAGS + opt("STARTTLS") +
                                    opt("STRUCTURED_REPLY") + opt("EXPORT_NAME"))
    yield "budget-async-big-reads", (
        bytes([1]) + CLIENT_FLAGS + opt("STRUCTURED_REPLY") +
        opt("SET_META_CONTEXT", meta_req("", ["base:allocation"])) + opt("GO", info_req("")) +
        b"".join(req("READ", i * 4096, 128 * 1024, cookie=i) for i in range(4)) +
        req("WRITE", 1, 100000, cookie=9, payload=bytes(range(256)) * 391)[:28 + 100000] +
        req("BLOCK_STATUS", 1, 200000, cookie=10) + req("READ", 4095, 70000, cookie=11) +
        req("DISC"))
    yield "meta-unknown-export", (
        bytes([0]) + CLIENT_FLAGS + opt("STRUCTURED_REPLY") +
        opt("LIST_META_CONTEXT", meta_req("nosuch", ["base:allocation"])) +
        opt("SET_META_CONTEXT", meta_req("ro", ["base:allocation"])) +
        opt("SET_META_CONTEXT", meta_req("", ["base:allocation", "base:"])) +
        opt("GO", info_req("ro")) + req("BLOCK_STATUS", 0, 4096) + req("DISC"))
    yield "secured-tls-required", (bytes([0x0c]) + CLIENT_FLAGS +
                                   opt("GO", info_req("")) + req("READ", 0, 512) +
                                   req("DISC"))


# ---- control protocol (fuzz-control) --------------------------------
def control_seeds():
    yield "status", b"status\n"
    yield "all-commands", (b"status\nquery\nhelp\ncache-all\npause\nresume\n"
                           b"rate 100mbit\nrate 0\nrate 12M\nflush\n"
                           b"reconnect nbd://127.0.0.1:10809/x\n"
                           b"detach\ndetach --force\nswitch -f\n")
    yield "errors", (b"nosuch\nrate\nrate 1 2\nrate lots\ndetach --now\n"
                     b"\n  \t \r\nstatus\x01\nstatus extra words here a b c d e f\n")
    yield "crlf-no-final-lf", b"status\r\nhelp\r\nstatus"
    yield "long-line", b"x" * 5000 + b"\nstatus\n"
    yield "long-line-crlf", b"status " + b"y" * 4090 + b"\r\nstatus\n"
    yield "unread-replies", b"help\n" * 300
    yield "hangup-during-jobs", b"\xff" + b"detach --force\nflush\nstatus\n"


# ---- WAN transport (fuzz-wan) -----------------------------------------
def wan_seeds():
    def hello(flags, level):
        return b"XNBDWAN\0" + struct.pack(">III", 1, flags, level)
    nbd = CLIENT_FLAGS + opt("GO", info_req("")) + req("READ", 0, 512)
    # Role byte: 0 = the harness is the client (fuzzes wan_serve),
    # 1 = the harness is the server (fuzzes wan_connect's side).
    yield "server-plain", bytes([0]) + hello(0, 3) + nbd
    yield "server-bad-magic", bytes([0]) + b"NBDMAGIC" + bytes(12)
    yield "server-tls-asked", bytes([0]) + hello(2, 3)
    reply_ok = b"XNBDWAN\0" + struct.pack(">III", 1, 0, 0)
    yield "client-plain", bytes([1]) + reply_ok + b"NBDMAGIC" + bytes(10)
    yield "client-refused", bytes([1]) + b"XNBDWAN\0" + struct.pack(">III", 1, 0, 1)
    frames = wan_zstd_frames()
    yield "server-zstd", bytes([0]) + hello(1, 3) + frames["nbd"]
    yield "client-zstd", (bytes([5]) + b"XNBDWAN\0" + struct.pack(">III", 1, 1, 0) +
                          frames["greeting"])
    # Early NBD options (WAN_F_EARLY = 4): a server that reads the client's
    # zstd whether or not it compresses itself (role byte 4: --compress=off);
    # a client (role 13: zstd, options sent ahead) answered by a server that
    # echoes EARLY, and by one from before it that turned compression off.
    yield "server-early", bytes([0]) + hello(5, 3) + frames["nbd"]
    yield "server-early-compress-off", bytes([4]) + hello(5, 3) + frames["nbd"]
    yield "client-early", (bytes([13]) + b"XNBDWAN\0" + struct.pack(">III", 1, 5, 0) +
                           frames["greeting"])
    yield "client-early-old-server", (bytes([13]) + b"XNBDWAN\0" +
                                      struct.pack(">III", 1, 0, 0) + b"NBDMAGIC" + bytes(10))


def wan_zstd_frames():
    """zstd streams made by the zstd command (a build dependency)."""
    import subprocess
    out = {}
    for name, raw in (("nbd", CLIENT_FLAGS + opt("GO", info_req("")) +
                       req("READ", 0, 512) + req("DISC")),
                      ("greeting", b"NBDMAGIC" + struct.pack(">QH", IHAVEOPT, 3) +
                       bytes(4096))):
        out[name] = subprocess.run(["zstd", "-q", "-c", "-3"], input=raw,
                                   stdout=subprocess.PIPE, check=True).stdout
    return out


# ---- bitmap files (fuzz-bitmap) ------------------------------------------
def bitmap_slot(seq, flags=0, bs=4096, size=1 << 20, src=b"fuzz-source"):
    nblocks = (size + bs - 1) // bs
    s = bytearray(2048)
    s[0:8] = b"XNBDBMAP"
    struct.pack_into(">IIQQQQQQI", s, 8, 1, flags, seq, bs, size, nblocks,
                     4096, (nblocks + 7) // 8, len(src))
    s[68:68 + len(src)] = src
    s[2016:2048] = hashlib.sha256(bytes(s[0:2016])).digest()
    return bytes(s)


def bitmap_file(slot_a, slot_b, bits):
    body = bytearray(bits)
    body += bytes((-len(body)) % 4096)
    return slot_a + slot_b + bytes(body)


def bitmap_seeds():
    # 1 MiB image, 4 KiB blocks: 256 bits = 32 bytes.
    yield "valid-empty", bitmap_file(bitmap_slot(1), bytes(2048), bytes(32))
    yield "valid-some-bits", bitmap_file(bitmap_slot(1), bytes(2048),
                                         b"\xff\x0f" + bytes(29) + b"\x80")
    yield "valid-complete-slot-b", bitmap_file(bitmap_slot(1), bitmap_slot(2, flags=1),
                                               b"\xff" * 32)
    yield "torn-slot-a", bitmap_file(bitmap_slot(3)[:-1] + b"\0", bitmap_slot(2),
                                     bytes(32))
    yield "other-geometry", bitmap_file(bitmap_slot(1, bs=65536, size=12345678),
                                        bytes(2048), bytes(4096))


# ---- block status from a source (fuzz-extents) --
def extents_seeds():
    M = 1 << 20
    def inp(off, length, size, words, reply_off=None):
        roff = (reply_off | 1) if reply_off is not None else 0
        return struct.pack(">QQQQ", off, length, size, roff) + b"".join(
            struct.pack(">I", w) for w in words)
    yield "ok", inp(0, 16 * M, 64 * M, [M, 0, M, 3])
    yield "extra-extent", inp(16 * M, 16 * M, 64 * M, [16 * M, 0, 8 * M, 3])
    yield "huge", inp(0, 16 * M, 64 * M, [0xFFFFF000, 3])
    yield "zero-length", inp(0, 16 * M, 64 * M, [0, 3, 4096, 0])
    yield "short", inp(0, 16 * M, 64 * M, [4096, 3])
    yield "odd", inp(0, 4096, 64 * M, [4096, 3, 4096])
    yield "past-end", inp(60 * M, 4 * M, 64 * M, [0xFFFFF000, 3])
    yield "other-offset", inp(8192, 4096, 64 * M, [4096, 3], reply_off=0)


TARGETS = dict(nbd=nbd_seeds, control=control_seeds, wan=wan_seeds,
               bitmap=bitmap_seeds, extents=extents_seeds)


def main():
    names = sys.argv[1:] or list(TARGETS)
    for name in names:
        d = os.path.join(CORPUS, name)
        os.makedirs(d, exist_ok=True)
        for seed, data in TARGETS[name]():
            with open(os.path.join(d, "seed-" + seed), "wb") as f:
                f.write(data)
        print(f"{d}: {len(os.listdir(d))} files")


if __name__ == "__main__":
    main()
