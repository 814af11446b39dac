#!/usr/bin/env bash
# Builds realistic disk images for the deduplication benchmark, once, and
# caches them (a later run prints the paths and does nothing else):
#
#   old.img          Debian 12 minbase (debootstrap --variant=minbase), as an
#                    ext4 filesystem made with mkfs.ext4 -d ROOT (sparse)
#   new.img          a fresh, separate debootstrap of the same plus
#                    python3 and openssh-server: the files of old.img are
#                    mostly there again, at other offsets ("any offset" case)
#   new-inplace.img  old.img copied, loop-mounted, and the same packages
#                    installed in place with chroot apt-get ("same offset"
#                    case); skipped (with a message) when loop mounts fail
#
#   scripts/bench/data/debian-images.sh        (as root; needs the network)
#
# Prints "NAME PATH" for each image that exists at the end.  When no Debian
# mirror can be reached, builds the offline fallback instead (see
# offline-images.sh) and says so: its names are prefixed with "offline-".
#
# Environment:
#   BENCH_CACHE       cache directory (default /var/cache/xnbd-bench when it
#                     can be made, else ${TMPDIR:-/tmp}/xnbd-bench-cache)
#   BENCH_MIRROR      Debian mirror (default http://deb.debian.org/debian)
#   BENCH_IMG_SIZE    image size for mkfs.ext4 (default 1536M)
#   BENCH_PACKAGES    packages that "new" adds (default "python3 openssh-server")
set -euo pipefail

ME=debian-images.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "$ME: $*" >&2; exit 1; }
# shellcheck source=cache.sh
. "$HERE/cache.sh"

MIRROR=${BENCH_MIRROR:-http://deb.debian.org/debian}
SIZE=${BENCH_IMG_SIZE:-1536M}
PKGS=${BENCH_PACKAGES:-python3 openssh-server}
SUITE=bookworm
[[ $SIZE =~ ^[1-9][0-9]*[MG]$ ]] || die "BENCH_IMG_SIZE must look like 1536M or 2G, not '$SIZE'"
[[ $PKGS =~ ^[a-z0-9.+\ -]+$ ]] || die "BENCH_PACKAGES must be Debian package names separated by spaces, not '$PKGS'"
(( EUID == 0 )) || die "must run as root (debootstrap, mkfs.ext4 -d of a root filesystem, loop mounts)"
for tool in debootstrap mkfs.ext4; do
    command -v "$tool" >/dev/null || die "$tool not found; run scripts/install-deps.sh (or apt-get install debootstrap e2fsprogs)"
done
cache=$(bench_cache_dir)
D=$cache/debian
mkdir -p "$D/debs"

# The cache key: an image is rebuilt when its recipe changes.
recipe="suite=$SUITE size=$SIZE pkgs=$PKGS v=1"
if [[ -f $D/recipe && $(cat "$D/recipe") != "$recipe" ]]; then
    echo "$ME: recipe changed ($(cat "$D/recipe") -> $recipe): rebuilding" >&2
    rm -f "$D"/*.img "$D/recipe"
fi
echo "$recipe" > "$D/recipe"

work=
mnt=
cleanup() {
    local rc=$?
    if [[ -n $mnt ]]; then
        for m in "$mnt/proc" "$mnt/dev/pts" "$mnt/dev" "$mnt"; do
            mountpoint -q "$m" 2>/dev/null && umount "$m" 2>/dev/null || true
        done
    fi
    [[ -n $work ]] && rm -rf --one-file-system "$work"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM
work=$(mktemp -d "$cache/build.XXXXXX")

# bootstrap ROOT [INCLUDE]: debootstrap minbase into ROOT.
bootstrap() {
    local inc=()
    [[ -n ${2:-} ]] && inc=(--include="${2// /,}")
    echo "$ME: debootstrap --variant=minbase ${inc[*]} $SUITE ($MIRROR), log in $1.log" >&2
    debootstrap --variant=minbase --cache-dir="$D/debs" "${inc[@]}" "$SUITE" "$1" "$MIRROR" \
        >"$1.log" 2>&1 || { tail -20 "$1.log" >&2; return 1; }
}

# mkimg ROOT IMG: an ext4 image of ROOT, sparse.
mkimg() {
    rm -f "$2.tmp"
    mkfs.ext4 -q -F -L xnbd-bench -d "$1" "$2.tmp" "$SIZE" >&2 || return 1
    mv "$2.tmp" "$2"
}

offline=0
if [[ ! -f $D/old.img || ! -f $D/new.img ]]; then
    if ! bootstrap "$work/old"; then
        echo "$ME: debootstrap could not build the minbase system (no mirror reachable?): using the OFFLINE fallback" >&2
        offline=1
    fi
    if (( ! offline )); then
        mkimg "$work/old" "$D/old.img"
        rm -rf --one-file-system "$work/old"
        bootstrap "$work/new" "$PKGS" || die "debootstrap of 'new' failed (see above)"
        mkimg "$work/new" "$D/new.img"
        rm -rf --one-file-system "$work/new"
    fi
fi

if (( ! offline )) && [[ ! -f $D/new-inplace.img ]]; then
    # Packages installed in place: old's filesystem, loop-mounted.
    cp --sparse=always "$D/old.img" "$work/inplace.img"
    mkdir -p "$work/mnt"
    if mount -o loop "$work/inplace.img" "$work/mnt" 2>"$work/mount.err"; then
        mnt=$work/mnt
        mount -t proc proc "$mnt/proc"
        mount --bind /dev "$mnt/dev"
        # No daemon starts inside the chroot.
        printf '#!/bin/sh\nexit 101\n' > "$mnt/usr/sbin/policy-rc.d"
        chmod 755 "$mnt/usr/sbin/policy-rc.d"
        cp /etc/resolv.conf "$mnt/etc/resolv.conf" 2>/dev/null || true
        echo "$ME: apt-get install $PKGS in place (chroot), log in $work/inplace.log" >&2
        # shellcheck disable=SC2086
        if chroot "$mnt" sh -c "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $PKGS && apt-get clean" \
            >"$work/inplace.log" 2>&1; then
            rm -f "$mnt/usr/sbin/policy-rc.d"
            for m in "$mnt/proc" "$mnt/dev" "$mnt"; do umount "$m"; done
            mnt=
            mv "$work/inplace.img" "$D/new-inplace.img"
        else
            tail -20 "$work/inplace.log" >&2
            echo "$ME: installing packages in place failed: no new-inplace.img" >&2
        fi
    else
        echo "$ME: cannot loop-mount ($(cat "$work/mount.err")): no new-inplace.img" >&2
    fi
fi

if (( offline )); then
    "$HERE/offline-images.sh"
    exit
fi
for n in old new new-inplace; do
    [[ -f $D/$n.img ]] && echo "$n $D/$n.img"
done
exit 0
