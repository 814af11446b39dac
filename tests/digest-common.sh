# shellcheck shell=bash
# digest-common.sh: sourced by the digest tests after functions.sh.
#
#   block_digests IMAGE OUT   the SHA-256 of each 4 KiB block of IMAGE (the
#                             last padded with zeros), 32 bytes each, in
#                             block order, into OUT -- computed by
#                             sha256sum(1), independently of xnbd's code.
#   digest_uri SOCKET [EXPORT]  the URI of EXPORT's digest export.

block_digests ()
{
  local image=$1 out=$2 d
  # One file per block: on tmpfs when there is one (a 24 MiB image took
  # 8 s on this machine's ext4, 0.5 s on tmpfs).
  if d=$(mktemp -d /dev/shm/"$TEST_NAME".blocks.XXXXXX 2>/dev/null); then
    cleanup_fn rm -rf "$d"
  else
    d=$(mktemp -d "$TESTDIR/blocks.XXXXXX")
  fi
  cp --sparse=always "$image" "$d/padded"
  truncate -s %4096 "$d/padded"
  (cd "$d" && split -b 4096 -d -a 7 padded b. && rm padded &&
     sha256sum b.*) | cut -c1-64 | xxd -r -p >"$out"
  rm -r "$d"
  local blocks=$(( ($(stat -c %s "$image") + 4095) / 4096 ))
  [ "$(stat -c %s "$out")" -eq $(( blocks * 32 )) ] ||
    fail "block_digests: $(stat -c %s "$out") bytes of digests for $blocks blocks"
}

digest_uri ()
{
  printf 'nbd+unix:///%s@xnbd-sha256?socket=%s' "${2:-}" "$1"
}
