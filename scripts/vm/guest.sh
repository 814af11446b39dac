#!/usr/bin/env bash
# Builds (once, then cached) a small Linux guest that proves its own
# integrity, for scripts/vm-migrate's test and demo:
#
#   kernel   Debian's cloud kernel (scripts/vm/kernel.sh)
#   initrd   busybox; /init keeps data in RAM and on its disk (/dev/vda, a
#            virtio disk of at least 4 MiB) with SHA-256 checksums that it
#            re-verifies continuously, and prints a counter
#
#   scripts/vm/guest.sh          prints "kernel PATH" and "initrd PATH"
#
# Boot it with: -kernel K -initrd I -append "console=ttyS0 panic=-1 quiet"
# -serial file:CONSOLE (any RAM size from 96M; one virtio-blk disk).  The
# guest's lines on the serial console, all starting with "xnbd-vm: ":
#
#   ready                    setup done (static data written, disk written)
#   n=N up=SECONDS           once per round; N goes up by one each round
#   ram c=C g=G sha=SHA      chunk C (64 pages of 4 KiB in tmpfs) now holds
#                            generation G; every page of it starts with the
#                            64-byte line "xnbd-ram c=C g=G p=P" (P = page
#                            0..63), SHA is the chunk's (pages in order)
#   disk k=K g=G sha=SHA     about to write generation G to disk block K
#                            (64 KiB at K * 64 KiB; starts with "xnbd-disk
#                            k=K g=G"); printed before the write
#   FAIL WHAT                a checksum did not match (RAM or disk)
#   t=K                      with "xnbd.tick=MS" on the kernel command line:
#                            a second process prints this every MS ms, K
#                            going up by one (host-side timestamps of these
#                            lines measure the guest's downtime)
#   (nothing)                with "xnbd.dirty=MIB": a third process rewrites
#                            MIB MiB of RAM (a tmpfs file) with random
#                            bytes, in place, without pause
#
# The 8 MiB of static RAM data are the same in every guest booted from this
# initrd (random bytes made once, shipped in it), as shared libraries are
# in real VMs: a VM's RAM can seed another's.  Every 4 KiB page of it starts
# with the 64-byte line "xnbd-static s=S p=P" (piece S, page P).
#
# Each round rewrites one RAM chunk and one disk block, and verifies one
# chunk, one 1 MiB piece of the 8 MiB of static RAM data and one disk block
# (read with O_DIRECT).  Cache directory: BENCH_CACHE (scripts/bench/data/
# cache.sh), subdirectory vm-guest.
set -euo pipefail
ME=guest.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "$ME: $*" >&2; exit 1; }
case "${1-}" in
    -h|--help) sed -n '2,/^set -e/{/^set -e/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    "") ;;
    *) die "no arguments expected (try --help)" ;;
esac
# shellcheck source=../bench/data/cache.sh
. "$HERE/../bench/data/cache.sh"
# shellcheck source=kernel.sh
. "$HERE/kernel.sh"
for tool in busybox gzip python3; do
    command -v "$tool" >/dev/null || die "$tool not found; run scripts/install-deps.sh (busybox-static)"
done
D=$(bench_cache_dir)/vm-guest
mkdir -p "$D"
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk)
vm_kernel "$D" "${MODULES[@]}" || die "could not get the kernel"

recipe=v4
# One file per recipe: trees with an older guest.sh share the cache.
initrd=$D/initrd-$recipe.gz
if [[ ! -f $initrd ]]; then
    r=$(mktemp -d "$D/initrd.XXXXXX")
    trap 'rm -rf "$r"' EXIT
    mkdir -p "$r/bin" "$r/proc" "$r/sys" "$r/dev" "$r/tmp" "$r/lib/modules"
    cp "$(command -v busybox)" "$r/bin/busybox"
    ln -s busybox "$r/bin/sh"
    for m in "${MODULES[@]}"; do cp "$D/modules/$m.ko" "$r/lib/modules/"; done
    echo "${MODULES[*]}" > "$r/lib/modules/order"
    python3 - "$r/static" <<'PY'
import os, sys
d = sys.argv[1]
os.mkdir(d)
for s in range(8):
    with open("%s/%d" % (d, s), "wb") as f:
        for p in range(256):
            f.write(("xnbd-static s=%d p=%d" % (s, p)).ljust(63).encode() + b"\n" + os.urandom(4032))
PY
    cat > "$r/init" <<'INIT'
#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs -o size=90% tmp /tmp
say() { echo "xnbd-vm: $*"; }
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko; done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ $i -le 100 ] || { say "FAIL no /dev/vda"; while :; do sleep 3600; done; }
    sleep 0.1
done
NSTATIC=8 NCHUNK=8 NDISK=32
sha() { sha256sum "$1" | cut -c1-64; }
mkdir /tmp/s /tmp/c /tmp/d
# Static RAM data: 8 x 1 MiB, from the initrd (the same in every guest).
for i in $(seq 0 $((NSTATIC - 1))); do
    cp /static/$i /tmp/s/$i
    sha /tmp/s/$i > /tmp/s/$i.sha
done
tick=$(sed -n 's/.*xnbd\.tick=\([0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$tick" ]; then
    ( k=0; while :; do k=$((k + 1)); echo "xnbd-vm: t=$k"; usleep $((tick * 1000)); done ) &
fi
# A memory-writing workload: "xnbd.dirty=MIB" rewrites MIB MiB of tmpfs
# pages with random bytes, in place, over and over, as fast as it can.
dirty=$(sed -n 's/.*xnbd\.dirty=\([0-9]*\).*/\1/p' /proc/cmdline)
if [ -n "$dirty" ] && [ "$dirty" -gt 0 ]; then
    ( while :; do dd if=/dev/urandom of=/tmp/dirty bs=1048576 count=$dirty conv=notrunc 2>/dev/null; done ) &
fi
# chunk C G: write RAM chunk C, generation G (a new file, then renamed,
# so the previous generation stays whole until this one is).
chunk() {
    head -c 4032 /dev/urandom > /tmp/c/blob
    p=0
    while [ $p -lt 64 ]; do
        printf '%-63s\n' "xnbd-ram c=$1 g=$2 p=$p"
        cat /tmp/c/blob
        p=$((p + 1))
    done > /tmp/c/new
    s=$(sha /tmp/c/new)
    say "ram c=$1 g=$2 sha=$s"
    echo $s > /tmp/c/$1.sha.new
    mv /tmp/c/new /tmp/c/$1
    mv /tmp/c/$1.sha.new /tmp/c/$1.sha
}
# block K G: write disk block K, generation G.
block() {
    { printf '%-63s\n' "xnbd-disk k=$1 g=$2"; head -c 65472 /dev/urandom; } > /tmp/d/new
    s=$(sha /tmp/d/new)
    say "disk k=$1 g=$2 sha=$s"
    dd if=/tmp/d/new of=/dev/vda bs=65536 seek=$1 conv=notrunc,fsync oflag=direct 2>/dev/null ||
        say "FAIL disk write k=$1"
    echo $s > /tmp/d/$1.sha
}
check() {  # check WHAT FILE SHAFILE
    [ "$(sha "$2")" = "$(cat "$3")" ] || say "FAIL $1 checksum"
}
check_block() {
    s=$(dd if=/dev/vda bs=65536 skip=$1 count=1 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)
    [ "$s" = "$(cat /tmp/d/$1.sha)" ] || say "FAIL disk k=$1 checksum"
}
for i in $(seq 0 $((NCHUNK - 1))); do chunk $i 0; done
for i in $(seq 0 $((NDISK - 1))); do block $i 0; done
say ready
n=0
while :; do
    n=$((n + 1))
    read up idle < /proc/uptime
    say "n=$n up=$up"
    chunk $((n % NCHUNK)) $n
    c=$(((n + NCHUNK / 2) % NCHUNK))
    check "ram c=$c" /tmp/c/$c /tmp/c/$c.sha
    s=$((n % NSTATIC))
    check "ram static=$s" /tmp/s/$s /tmp/s/$s.sha
    block $((n % NDISK)) $n
    check_block $(((n + NDISK / 2) % NDISK))
    sleep 0.05
done
INIT
    chmod 755 "$r/init"
    (cd "$r" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$initrd.tmp$$"
    mv "$initrd.tmp$$" "$initrd"
fi
echo "kernel $D/vmlinuz"
echo "initrd $initrd"
