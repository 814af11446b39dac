#!/usr/bin/env bash
# The OFFLINE fallback of debian-images.sh, for machines that cannot reach a
# Debian mirror (clearly labelled "offline-" in the benchmark's tables):
#
#   offline-old.img   ext4 (mkfs.ext4 -d) of this machine's /usr
#   offline-new.img   a separate mkfs.ext4 -d of /usr plus /opt (as usr/ and
#                     opt/): the same files again, at other offsets
#
#   scripts/bench/data/offline-images.sh       (as root)
#
# Prints "NAME PATH" for each image.  Uses BENCH_CACHE as debian-images.sh.
set -euo pipefail
ME=offline-images.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "$ME: $*" >&2; exit 1; }
# shellcheck source=cache.sh
. "$HERE/cache.sh"
SIZE=${BENCH_IMG_SIZE:-3G}
(( EUID == 0 )) || die "must run as root (to read all of /usr)"
command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not found; apt-get install e2fsprogs"
D=$(bench_cache_dir)/offline
mkdir -p "$D"
work=
trap '[[ -n $work ]] && rm -rf --one-file-system "$work"' EXIT
work=$(mktemp -d "$D/build.XXXXXX")
if [[ ! -f $D/offline-old.img ]]; then
    mkdir "$work/old"
    cp -a /usr "$work/old/usr"
    mkfs.ext4 -q -F -d "$work/old" "$D/offline-old.img.tmp" "$SIZE" >&2
    mv "$D/offline-old.img.tmp" "$D/offline-old.img"
    rm -rf "$work/old"
fi
if [[ ! -f $D/offline-new.img ]]; then
    mkdir "$work/new"
    cp -a /usr "$work/new/usr"
    [[ -d /opt ]] && cp -a /opt "$work/new/opt"
    mkfs.ext4 -q -F -d "$work/new" "$D/offline-new.img.tmp" "$SIZE" >&2
    mv "$D/offline-new.img.tmp" "$D/offline-new.img"
fi
echo "old $D/offline-old.img"
echo "new $D/offline-new.img"
