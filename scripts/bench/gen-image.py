#!/usr/bin/env python3
"""Write a deterministic benchmark disk image of 4 KiB blocks.

    scripts/bench/gen-image.py [--dense] SIZE_MIB OUT [SEED]

The blocks, in a shuffled order that depends only on SEED (default 1):

    40 %  random bytes (incompressible)
    30 %  zero          (holes: the file is sparse, as a real VM disk is where
                         the guest never wrote; --dense writes the zeros)
    30 %  text-like     (English-ish words, punctuation and lines drawn from a
                         Zipf-distributed vocabulary; every block different;
                         zstd -3 compresses these blocks about 3-4x)

The same SIZE_MIB and SEED give the same bytes on every run and machine.
About 1 GiB in a few seconds (random blocks from random.Random.randbytes,
text from table look-ups, written in 16 MiB batches).  Prints one summary
line (block counts) on stdout.
"""
import os
import random
import sys

BLOCK = 4096
BATCH = 4096                # blocks per write batch (16 MiB)
RANDOM, ZERO, TEXT = 0, 1, 2

ONSETS = ("", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t",
          "w", "th", "st", "ch", "sh", "pr", "tr", "br", "gr", "wh", "pl", "cl")
VOWELS = ("a", "e", "i", "o", "u", "ea", "ou", "ai", "e", "a", "o", "i")
CODAS = ("", "", "n", "r", "s", "t", "d", "l", "nd", "st", "ng", "ck", "m", "th")
SHORT = ("the", "of", "and", "to", "a", "in", "is", "it", "that", "was", "for",
         "on", "are", "with", "as", "he", "be", "at", "by", "this", "had",
         "not", "but", "from", "or", "have", "an", "they", "which", "one",
         "you", "were", "her", "all", "she", "there", "would", "their", "we")


def make_table(seed):
    """65536 tokens of two words (each with what follows it: a space, a
    comma, a full stop, a line end); a token is picked by a uniform 16-bit
    number, and a word's share of the table is its (Zipf) frequency."""
    rng = random.Random("%s-vocabulary" % seed)
    words = list(SHORT)
    seen = set(words)
    while len(words) < 6000:
        w = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                    for _ in range(rng.choice((1, 1, 2, 2, 2, 3, 3, 4))))
        if len(w) > 1 and w not in seen:
            seen.add(w)
            words.append(w)
    # Zipf: weight of rank r is 1/(r + 2.7).
    weights = [1.0 / (r + 2.7) for r in range(len(words))]
    scale = 65536 / sum(weights)
    table = []
    for w, wt in zip(words, weights):
        table.extend([w] * max(1, round(wt * scale)))
    del table[65536:]
    while len(table) < 65536:
        table.append(words[rng.randrange(len(words))])
    rng.shuffle(table)
    out = []
    for i in range(65536):
        pair = []
        for w in (table[i], table[rng.randrange(65536)]):
            x = rng.random()
            if x < 0.035:
                pair.append(w + ".\n")
            elif x < 0.07:
                pair.append(w + ". " + w[:1].upper() + w[1:] + " ")
            elif x < 0.12:
                pair.append(w + ", ")
            elif x < 0.125:
                pair.append(w + " %d " % rng.randrange(2000))
            else:
                pair.append(w + " ")
        out.append("".join(pair))
    return out


class TextSource:
    """Endless English-ish text; hands it out in 4 KiB blocks."""

    def __init__(self, seed):
        self.rng = random.Random("%s-text" % seed)
        self.table = make_table(seed)
        self.buf = b""
        self.pos = 0

    def blocks(self, n):
        need = n * BLOCK
        if len(self.buf) - self.pos < need:
            rest = self.buf[self.pos:]
            # Tokens average about 12 bytes: ask for a little more than needed.
            count = (need - len(rest)) // 10 + 1024
            idx = memoryview(self.rng.randbytes(2 * count)).cast("H")
            self.buf = rest + "".join(map(self.table.__getitem__, idx)).encode()
            self.pos = 0
            if len(self.buf) < need:          # cannot happen in practice
                return self.blocks(n)
        out = self.buf[self.pos:self.pos + need]
        self.pos += need
        return out


def main(argv):
    dense = False
    if argv and argv[0] == "--dense":
        dense = True
        argv = argv[1:]
    if len(argv) not in (2, 3) or argv[0] in ("-h", "--help"):
        sys.stderr.write(__doc__.split("\n\n")[1] + "\n")
        return 2 if argv[:1] not in (["-h"], ["--help"]) else 0
    try:
        size_mib = int(argv[0])
        seed = int(argv[2]) if len(argv) == 3 else 1
        if size_mib <= 0:
            raise ValueError
    except ValueError:
        sys.stderr.write("gen-image.py: SIZE_MIB must be a positive integer and "
                         "SEED an integer\n")
        return 2
    out = argv[1]
    nblocks = size_mib * (1 << 20) // BLOCK
    n_rand = nblocks * 40 // 100
    n_zero = nblocks * 30 // 100
    n_text = nblocks - n_rand - n_zero
    kinds = bytearray([RANDOM]) * n_rand + bytearray([ZERO]) * n_zero + \
        bytearray([TEXT]) * n_text
    random.Random("%s-layout" % seed).shuffle(kinds)

    rand_rng = random.Random("%s-random" % seed)
    text = TextSource(seed)
    zero_block = bytes(BLOCK)
    try:
        # Replace, not truncate: on ext4, truncating a file that still has
        # dirty pages waits for their write-back (seconds for 1 GiB) and
        # makes close() flush the new data (auto_da_alloc).
        if os.path.lexists(out) and not os.path.isdir(out):
            os.unlink(out)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        sys.stderr.write("gen-image.py: cannot create %s: %s\n" % (out, e.strerror))
        return 1
    try:
        for b0 in range(0, nblocks, BATCH):
            b1 = min(b0 + BATCH, nblocks)
            chunk = kinds[b0:b1]
            nr = chunk.count(RANDOM)
            nt = chunk.count(TEXT)
            rdata = rand_rng.randbytes(nr * BLOCK)
            tdata = text.blocks(nt)
            ri = ti = 0
            run = []            # contiguous blocks to write at run_start
            run_start = b0
            for i, k in enumerate(chunk):
                if k == RANDOM:
                    run.append(rdata[ri:ri + BLOCK])
                    ri += BLOCK
                elif k == TEXT:
                    run.append(tdata[ti:ti + BLOCK])
                    ti += BLOCK
                elif dense:
                    run.append(zero_block)
                else:
                    if run:
                        os.pwrite(fd, b"".join(run), run_start * BLOCK)
                        run = []
                    run_start = b0 + i + 1
            if run:
                os.pwrite(fd, b"".join(run), run_start * BLOCK)
        os.ftruncate(fd, nblocks * BLOCK)
    except OSError as e:
        sys.stderr.write("gen-image.py: writing %s: %s\n" % (out, e.strerror))
        return 1
    finally:
        os.close(fd)
    print("gen-image: %s: %d MiB, %d blocks of 4 KiB: %d random, %d zero%s, "
          "%d text (seed %d)" % (out, size_mib, nblocks, n_rand, n_zero,
                                 "" if dense else " (holes)", n_text, seed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
