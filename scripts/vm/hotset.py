#!/usr/bin/env python3
"""Which guest pages a QEMU process wrote recently, and how many of a
migrated guest's first misses at B they cover (a measuring aid for the
whole-VM benchmark, BENCH_VM_HOTSET=1 in scripts/bench/vm.sh; Linux, root).

    hotset.py check                     whether this kernel keeps soft-dirty
                                        bits (CONFIG_MEM_SOFT_DIRTY); exit 1
                                        and a message if not
    hotset.py clear PID                 start tracking: clear the soft-dirty
                                        bits of PID's pages (clear_refs 4)
    hotset.py written PID RAMFILE OUT   the pages of RAMFILE that PID wrote
                                        since, from /proc/PID/pagemap (bit
                                        55), one 4 KiB page number a line
    hotset.py cover WRITTEN PROXYLOG    the proxy's logged misses (-v: "miss:
                                        blocks N+K ...") against WRITTEN:
                                        prints one JSON line

Soft-dirty bits see writes only: pages the guest only reads (its code, page
tables) are not in WRITTEN.
"""
import json
import os
import re
import struct
import sys

PAGE = 4096


def die(msg):
    sys.stderr.write("hotset.py: %s\n" % msg)
    sys.exit(1)


def check():
    """Writes a page of its own after clearing the bits: is it marked?"""
    import ctypes
    import mmap
    m = mmap.mmap(-1, PAGE)
    m[0] = 1
    with open("/proc/self/clear_refs", "w") as f:
        f.write("4")
    m[0] = 2
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        (e,) = struct.unpack("<Q", f.read(8))
    if not e >> 55 & 1:
        die("this kernel keeps no soft-dirty bits (built without CONFIG_MEM_SOFT_DIRTY): "
            "the pages a process wrote cannot be told")


def clear(pid):
    with open("/proc/%d/clear_refs" % pid, "w") as f:
        f.write("4")


def mapping_of(pid, path):
    """(start, end, file offset) of PID's mapping of path (the largest)."""
    real = os.path.realpath(path)
    best = None
    with open("/proc/%d/maps" % pid) as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 6 or os.path.realpath(parts[5].strip()) != real:
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if best is None or hi - lo > best[1] - best[0]:
                best = (lo, hi, int(parts[2], 16))
    if best is None:
        die("process %d does not map %s" % (pid, path))
    return best


def written(pid, path, out):
    lo, hi, foff = mapping_of(pid, path)
    pages = []
    with open("/proc/%d/pagemap" % pid, "rb") as f:
        f.seek(lo // PAGE * 8)
        n = (hi - lo) // PAGE
        done = 0
        while done < n:
            k = min(65536, n - done)
            buf = f.read(k * 8)
            for i, (e,) in enumerate(struct.iter_unpack("<Q", buf)):
                if e >> 55 & 1:
                    pages.append(foff // PAGE + done + i)
            done += k
    with open(out, "w") as f:
        f.write("".join("%d\n" % p for p in pages))
    print(len(pages))


def cover(wfile, log):
    w = set(int(l) for l in open(wfile) if l.strip())
    ondemand, joined = [], []
    pat = re.compile(r"miss: blocks (\d+)\+(\d+) (fetched on demand|wait for a background fetch)")
    for line in open(log, errors="replace"):
        m = pat.search(line)
        if m:
            first, n = int(m.group(1)), int(m.group(2))
            (ondemand if m.group(3).startswith("fetched") else joined).append(range(first, first + n))

    def hit(runs):
        return sum(1 for r in runs if any(b in w for b in r))

    print(json.dumps({"written_pages": len(w), "ondemand_misses": len(ondemand),
                      "ondemand_in_written": hit(ondemand), "joined_misses": len(joined),
                      "joined_in_written": hit(joined)}))


def main():
    a = sys.argv[1:]
    if a == ["check"]:
        check()
    elif len(a) == 2 and a[0] == "clear":
        clear(int(a[1]))
    elif len(a) == 4 and a[0] == "written":
        written(int(a[1]), a[2], a[3])
    elif len(a) == 3 and a[0] == "cover":
        cover(a[1], a[2])
    else:
        die("usage: hotset.py check | clear PID | written PID RAMFILE OUT | cover WRITTEN PROXYLOG")


if __name__ == "__main__":
    main()
