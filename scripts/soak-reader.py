#!/usr/bin/python3
"""Concurrent checked reader for scripts/soak.sh (not a test by itself).

    soak-reader.py URI SOURCE_IMG SEEDS_FILE STATS_FILE STOP_FILE SEED MAX_SECONDS MAX_KIB

Reads random regions (4 KiB aligned, 16 KiB to MAX_KIB) of the export at
URI, one every 0.3-0.7 s, while crashload writers write to it, and checks every
512-byte sector it reads: it must be the source image's sector at that
offset, or an undamaged crashload stamp for that very offset whose seed is
listed in SEEDS_FILE (one seed a line: the writer sessions of this cycle).
A sector that is neither is read once more (a read racing a write to the
same sector may legitimately see a mix); if the second read is still
neither, it is a failure, logged with its offset and first bytes.

A lost connection (the proxy being restarted) is counted and the reader
reconnects; a read that fails on a live connection (e.g. EIO) is a failure.
Stops when STOP_FILE exists or after MAX_SECONDS.  Writes its counters as
one JSON object to STATS_FILE (every few seconds and at the end) and
failure lines to stdout.  Needs python3-libnbd (Debian's /usr/bin/python3).
"""
import json
import os
import random
import sys
import time

import nbd

SECTOR = 512
MAGIC = b"XNBDCRSH"
M64 = (1 << 64) - 1


def splitmix_words(x, n):
    out = []
    for _ in range(n):
        x = (x + 0x9E3779B97F4A7C15) & M64
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        out.append(z ^ (z >> 31))
    return out


def stamp(gen, seq, off):
    """crashload.c stamp_sector: the content write SEQ puts at offset OFF."""
    x = gen ^ ((seq * 0x9E3779B97F4A7C15) & M64) ^ ((off * 0xC2B2AE3D27D4EB4F) & M64)
    b = bytearray(MAGIC)
    for v in [gen, seq, off] + splitmix_words(x, (SECTOR - 32) // 8):
        b += v.to_bytes(8, "little")
    return bytes(b)


def main():
    uri, src_path, seeds_path, stats_path, stop_path = sys.argv[1:6]
    rng = random.Random(int(sys.argv[6]))
    deadline = time.monotonic() + float(sys.argv[7])
    max_blocks = int(sys.argv[8]) // 4
    src = os.open(src_path, os.O_RDONLY)
    size = os.fstat(src).st_size
    st = dict(reads=0, bytes=0, stamped_sectors=0, disconnects=0, connect_retries=0,
              read_errors=0, bad_sectors=0, reread_ok=0)
    seeds = set()

    def load_seeds():
        try:
            with open(seeds_path) as f:
                seeds.update(int(l) for l in f if l.strip())
        except OSError:
            pass

    def ok_sector(data, off):
        if data == os.pread(src, SECTOR, off):
            return True
        if data[:8] != MAGIC or int.from_bytes(data[24:32], "little") != off:
            return False
        gen = int.from_bytes(data[8:16], "little")
        if gen not in seeds:
            load_seeds()
        if gen not in seeds:
            return False
        if data != stamp(gen, int.from_bytes(data[16:24], "little"), off):
            return False
        st["stamped_sectors"] += 1
        return True

    def save():
        tmp = stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(st, f)
        os.replace(tmp, stats_path)

    h = None
    last_save = 0.0
    while not os.path.exists(stop_path) and time.monotonic() < deadline:
        now = time.monotonic()
        if now - last_save > 2:
            save()
            last_save = now
        if h is None:
            try:
                h = nbd.NBD()
                h.connect_uri(uri)
            except nbd.Error:
                h = None
                st["connect_retries"] += 1
                time.sleep(0.2)
                continue
        ln = rng.randint(4, max(4, max_blocks)) * 4096
        ln = min(ln, size)
        off = rng.randrange(0, (size - ln) // 4096 + 1) * 4096
        try:
            data = h.pread(ln, off)
        except nbd.Error as e:
            if h.aio_is_dead() or h.aio_is_closed():
                st["disconnects"] += 1
                h = None
            else:
                st["read_errors"] += 1
                print("%.3f read %d+%d failed on a live connection: %s"
                      % (time.time(), off, ln, e), flush=True)
            continue
        st["reads"] += 1
        st["bytes"] += ln
        if data != os.pread(src, ln, off):
            for so in range(0, ln, SECTOR):
                sec = data[so:so + SECTOR]
                if ok_sector(sec, off + so):
                    continue
                try:
                    again = h.pread(SECTOR, off + so)
                except nbd.Error:
                    again = None
                if again is not None and ok_sector(again, off + so):
                    st["reread_ok"] += 1
                    continue
                st["bad_sectors"] += 1
                if st["bad_sectors"] <= 20:
                    print("%.3f BAD sector at offset %d: first bytes %s (re-read: %s)"
                          % (time.time(), off + so, sec[:32].hex(),
                             again[:32].hex() if again is not None else "failed"), flush=True)
        time.sleep(rng.uniform(0.3, 0.7))
    save()
    if h is not None:
        try:
            h.shutdown()
        except nbd.Error:
            pass


if __name__ == "__main__":
    main()
