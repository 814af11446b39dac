#!/usr/bin/env bash
# Install the Debian packages xnbd needs to build, test and benchmark.
# Quick no-op (no apt-get update) when everything is already installed.
#   scripts/install-deps.sh            install what is missing
#   scripts/install-deps.sh --check    only report; exit 1 if something is missing
set -euo pipefail

PACKAGES=(
    gcc make pkg-config
    libevent-dev libnbd-dev libzstd-dev libssl-dev libgnutls28-dev
    libcriterion-dev nbdkit-plugin-dev
    libnbd-bin nbdkit nbdfuse fuse3 gnutls-bin qemu-utils fio iproute2
    python3 python3-libnbd socat procps openssl zstd xxd
    debootstrap e2fsprogs qemu-system-x86 busybox-static   # make bench: dedup data (scripts/bench/data); test-vm-migrate
    clang libclang-rt-14-dev          # make fuzz: libFuzzer
)

check_only=0
case "${1-}" in
    --check) check_only=1 ;;
    -h|--help) sed -n '2,5s/^# \{0,1\}//p' "$0"; exit 0 ;;
    "") ;;
    *) echo "install-deps.sh: unknown argument '$1' (try --help)" >&2; exit 1 ;;
esac

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "install-deps.sh: dpkg-query not found; this script supports Debian/Ubuntu only." >&2
    echo "install-deps.sh: install these packages by hand: ${PACKAGES[*]}" >&2
    exit 1
fi

# Names that installed packages satisfy: their own names and what they
# Provide (on Debian 12, nbdfuse is a virtual package provided by libnbd-bin).
installed_names() {
    dpkg-query -W -f='${db:Status-Status}\t${Package}\t${Provides}\n' 2>/dev/null |
        awk -F'\t' '$1 == "installed" {
            print $2
            n = split($3, prov, /, */)
            for (i = 1; i <= n; i++) { sub(/ .*/, "", prov[i]); if (prov[i] != "") print prov[i] }
        }'
}

# Prints the members of PACKAGES that nothing installed satisfies.
missing_packages() {
    local -A have=()
    local name p
    while IFS= read -r name; do have[$name]=1; done < <(installed_names)
    for p in "${PACKAGES[@]}"; do
        [[ -n ${have[$p]-} ]] || printf '%s\n' "$p"
    done
}

mapfile -t missing < <(missing_packages)

if (( ${#missing[@]} == 0 )); then
    exit 0
fi

echo "install-deps.sh: missing Debian packages: ${missing[*]}"
if (( check_only )); then
    exit 1
fi

sudo=()
if (( EUID != 0 )); then
    if command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "install-deps.sh: not root and sudo is not installed; run as root:" >&2
        echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
fi

if ! "${sudo[@]}" apt-get update; then
    echo "install-deps.sh: 'apt-get update' failed (no network or broken sources?)." >&2
    echo "install-deps.sh: install by hand: apt-get install -y ${missing[*]}" >&2
    exit 1
fi
if ! "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y "${missing[@]}"; then
    echo "install-deps.sh: could not install: ${missing[*]}" >&2
    echo "install-deps.sh: check your apt sources, then run: apt-get install -y ${missing[*]}" >&2
    exit 1
fi

# Verify: apt-get may "succeed" without installing a package that does not exist.
mapfile -t still < <(missing_packages)
if (( ${#still[@]} )); then
    echo "install-deps.sh: still missing after apt-get install: ${still[*]}" >&2
    exit 1
fi
echo "install-deps.sh: installed ${missing[*]}"
