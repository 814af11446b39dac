#!/usr/bin/env python3
"""Statistics of a benchmark image for the migration benchmarks.

    scripts/bench/image-stats.py IMAGE ZSTD_LEVEL N OUTDIR SEED

Prints "NONZERO ZSTD": the bytes of the image's non-zero 4 KiB blocks, and
the size of those blocks concatenated and compressed by `zstd -LEVEL` (what
must cross the link).  Writes OUTDIR/lat-idle.off and OUTDIR/lat-copy.off:
N offsets of non-zero blocks, spread evenly over the whole image and over
its last 40 % (which an ascending background copy reaches last), shuffled
(deterministically, from SEED).
"""
import random
import subprocess
import sys
import threading

path, level, n, tmp, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
z = bytes(4096)
nonzero = []
zst = subprocess.Popen(["zstd", "-q", "-%s" % level, "-c"], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE)
out = []
t = threading.Thread(target=lambda: out.append(len(zst.stdout.read())))
t.start()
blk = 0
with open(path, "rb", buffering=0) as f:
    while True:
        b = f.read(1 << 22)
        if not b:
            break
        keep = []
        for i in range(0, len(b), 4096):
            x = b[i:i + 4096]
            if x != z[:len(x)]:
                keep.append(x)
                nonzero.append(blk)
            blk += 1
        zst.stdin.write(b"".join(keep))
zst.stdin.close()
zst.wait()
t.join()
total = blk


def pick(lo, hi, name):
    cand = [b for b in nonzero if lo <= b < hi]
    rng = random.Random("%s-lat-%s" % (seed, name))
    sel = []
    for i in range(n):                       # one per slot of the range
        s = cand[len(cand) * i // n:len(cand) * (i + 1) // n] or cand
        sel.append(rng.choice(s))
    rng.shuffle(sel)
    with open("%s/lat-%s.off" % (tmp, name), "w") as f:
        f.write("".join("%d\n" % (b * 4096) for b in sel))


pick(0, total, "idle")
pick(total * 6 // 10, total, "copy")
print(len(nonzero) * 4096, out[0])
