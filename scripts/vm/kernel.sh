# shellcheck shell=bash
# Sourced by the VM scripts (scripts/vm/guest.sh, scripts/bench/data/vm-ram.sh):
#
#   vm_kernel DIR [MODULE...]
#       makes DIR/vmlinuz (Debian's cloud kernel, unpacked from its package
#       with apt-get download + dpkg-deb -x, never installed) and copies each
#       named module (e.g. virtio_blk) to DIR/modules/NAME.ko; does nothing
#       for what DIR already holds.  Needs apt-get and dpkg-deb, and the
#       network the first time.  Returns 1 with a message on failure.
vm_kernel() {
    local dir=$1 m need=0 pkg tmp f
    shift
    [[ -f $dir/vmlinuz ]] || need=1
    for m in "$@"; do [[ -f $dir/modules/$m.ko ]] || need=1; done
    (( need )) || return 0
    for f in apt-cache apt-get dpkg-deb; do
        command -v "$f" >/dev/null || { echo "vm_kernel: $f not found (Debian only)" >&2; return 1; }
    done
    pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ { print $2; exit }')
    [[ -n $pkg ]] || { echo "vm_kernel: no linux-image-cloud-amd64 in the apt lists (run apt-get update)" >&2; return 1; }
    tmp=$(mktemp -d "$dir/kernel.XXXXXX") || return 1
    if ! (cd "$tmp" && apt-get download "$pkg" >&2 2>"$tmp/apt.log"); then
        cat "$tmp/apt.log" >&2; rm -rf "$tmp"
        echo "vm_kernel: apt-get download $pkg failed (network? apt sources?)" >&2
        return 1
    fi
    dpkg-deb -x "$tmp"/linux-image-*.deb "$tmp/k" || { rm -rf "$tmp"; return 1; }
    mkdir -p "$dir/modules"
    for m in "$@"; do
        f=$(find "$tmp/k/lib/modules" -name "$m.ko" -print -quit)
        if [[ -z $f ]]; then
            rm -rf "$tmp"
            echo "vm_kernel: module $m.ko is not in $pkg (compressed or built in?)" >&2
            return 1
        fi
        cp "$f" "$dir/modules/$m.ko"
    done
    cp "$tmp"/k/boot/vmlinuz-* "$dir/vmlinuz.tmp" && mv "$dir/vmlinuz.tmp" "$dir/vmlinuz"
    rm -rf "$tmp"
}
