# shellcheck shell=bash
# vm-common.sh: sourced by the VM migration tests after functions.sh.
# Skips in the sanitizer pass and where /dev/fuse cannot be opened, checks
# the tools, builds (or finds, cached) the self-checking guest of
# scripts/vm/guest.sh, and sets:
#   kernel, initrd   the guest's kernel and initramfs
#   MIGRATE, QMP     scripts/vm-migrate and scripts/vm/qmp.py
case $XNBD_BUILD in
  *build-asan) skip "the VM migration tests do not run in the sanitizer pass (QEMU TCG is slow; the programs they drive are covered by the other tests)" ;;
esac
requires qemu-system-x86_64 nbdfuse fusermount3 mountpoint busybox python3
requires_path /dev/fuse
if ! { exec 9<>/dev/fuse; } 2>/dev/null; then
  skip "/dev/fuse cannot be opened here"
fi
exec 9>&-

guest=$("$XNBD_SRC/scripts/vm/guest.sh") || fail "scripts/vm/guest.sh could not build the guest"
kernel=$(awk '$1 == "kernel" { print $2 }' <<<"$guest")
initrd=$(awk '$1 == "initrd" { print $2 }' <<<"$guest")
# shellcheck disable=SC2034  # used by the tests that source this
MIGRATE=$XNBD_SRC/scripts/vm-migrate
# shellcheck disable=SC2034
QMP=$XNBD_SRC/scripts/vm/qmp.py
