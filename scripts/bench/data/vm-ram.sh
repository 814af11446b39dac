#!/usr/bin/env bash
# Builds RAM images of small Linux VMs for the deduplication benchmark,
# once, and caches them (a later run prints the paths and does nothing
# else):
#
#   vm1.ram, vm2.ram   the RAM (a memory-backend file, shared with QEMU) of
#                      two runs of the same VM: Debian's cloud kernel and a
#                      busybox initramfs, booted under TCG until the guest
#                      printed its ready line on the serial console (after
#                      a little work: a few MiB of files in tmpfs), then
#                      QEMU is told to quit and the file is kept
#
#   scripts/bench/data/vm-ram.sh              (as root; needs the network
#                                             once, for the kernel package)
#
# Prints "NAME PATH" for each image.  Environment: BENCH_CACHE (see
# cache.sh), BENCH_VM_RAM (default 256M), BENCH_VM_APPEND (extra kernel
# arguments, e.g. nokaslr).
set -euo pipefail
ME=vm-ram.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "$ME: $*" >&2; exit 1; }
# shellcheck source=cache.sh
. "$HERE/cache.sh"
RAM=${BENCH_VM_RAM:-256M}
APPEND=${BENCH_VM_APPEND:-}
[[ $RAM =~ ^[1-9][0-9]*M$ ]] || die "BENCH_VM_RAM must look like 256M, not '$RAM'"
[[ $APPEND =~ ^[A-Za-z0-9_.=,\ -]*$ ]] || die "BENCH_VM_APPEND has characters a kernel argument does not need: '$APPEND'"
(( EUID == 0 )) || die "must run as root (apt-get download, dpkg-deb)"
for tool in qemu-system-x86_64 busybox gzip apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || die "$tool not found; run scripts/install-deps.sh (qemu-system-x86, busybox-static)"
done
D=$(bench_cache_dir)/vm
mkdir -p "$D"
recipe="ram=$RAM append=$APPEND v=1"
if [[ -f $D/recipe && $(cat "$D/recipe") != "$recipe" ]]; then
    rm -f "$D"/*.ram "$D/recipe"
fi
echo "$recipe" > "$D/recipe"

work= qpid=
cleanup() {
    local rc=$?
    [[ -n $qpid ]] && kill "$qpid" 2>/dev/null && wait "$qpid" 2>/dev/null
    [[ -n $work ]] && rm -rf "$work"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
work=$(mktemp -d "$D/build.XXXXXX")

# The kernel: Debian's cloud kernel package, unpacked (not installed).
if [[ ! -f $D/vmlinuz ]]; then
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
    [[ -n $pkg ]] || die "no linux-image-cloud-amd64 in the apt lists (run apt-get update)"
    (cd "$work" && apt-get download "$pkg" >&2) || die "apt-get download $pkg failed"
    dpkg-deb -x "$work"/linux-image-*.deb "$work/k"
    cp "$work"/k/boot/vmlinuz-* "$D/vmlinuz.tmp" && mv "$D/vmlinuz.tmp" "$D/vmlinuz"
fi

# The initramfs: busybox; /init does some work, prints the ready line,
# then idles.
if [[ ! -f $D/initrd.gz ]]; then
    r=$work/initrd
    mkdir -p "$r/bin" "$r/proc" "$r/sys" "$r/dev" "$r/tmp"
    cp "$(command -v busybox)" "$r/bin/busybox"
    ln -s busybox "$r/bin/sh"
    cat > "$r/init" <<'INIT'
#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
# Some work a small VM does: files in tmpfs (text, binaries, random).
for i in 1 2 3 4; do cp /bin/busybox /tmp/bb$i; done
dmesg > /tmp/dmesg.txt
ps > /tmp/ps.txt
head -c 4194304 /dev/urandom > /tmp/random
echo "xnbd-bench: ready"
while :; do sleep 3600; done
INIT
    chmod 755 "$r/init"
    (cd "$r" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -9) > "$D/initrd.gz.tmp"
    mv "$D/initrd.gz.tmp" "$D/initrd.gz"
fi

# boot NAME: one VM run; its RAM stays in NAME.ram.
boot() {
    local ram=$D/$1.ram con=$work/$1.console mon=$work/$1.mon i
    rm -f "$ram.tmp" "$con" "$mon"
    echo "$ME: booting $1 (TCG, $RAM), console in $con" >&2
    qemu-system-x86_64 -accel tcg -m "$RAM" -smp 1 -nodefaults -display none \
        -object "memory-backend-file,id=m,size=$RAM,mem-path=$ram.tmp,share=on" \
        -machine pc,memory-backend=m -kernel "$D/vmlinuz" -initrd "$D/initrd.gz" \
        -append "console=ttyS0 panic=-1 $APPEND" -serial "file:$con" \
        -monitor "unix:$mon,server,nowait" -no-reboot 2>"$work/$1.qemu.log" &
    qpid=$!
    for (( i = 0; i < 3000; i++ )); do        # 300 s at most (TCG is slow)
        grep -q 'xnbd-bench: ready' "$con" 2>/dev/null && break
        kill -0 "$qpid" 2>/dev/null || break
        sleep 0.1
    done
    if ! grep -q 'xnbd-bench: ready' "$con" 2>/dev/null; then
        tail -5 "$con" "$work/$1.qemu.log" >&2 || true
        die "$1 did not print its ready line"
    fi
    python3 -c 'import socket,sys,time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b"quit\n")
s.settimeout(10)
try:
    while s.recv(4096): pass
except OSError: pass' "$mon"
    wait "$qpid" || true
    qpid=
    mv "$ram.tmp" "$ram"
}
[[ -f $D/vm1.ram ]] || boot vm1
[[ -f $D/vm2.ram ]] || boot vm2
echo "vm1 $D/vm1.ram"
echo "vm2 $D/vm2.ram"
