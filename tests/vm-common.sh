# shellcheck shell=bash
# vm-common.sh: sourced by the VM migration tests after functions.sh.
# Skips in the sanitizer pass and where /dev/fuse cannot be opened, checks
# the tools, builds (or finds, cached) the self-checking guest of
# scripts/vm/guest.sh, and sets:
#   kernel, initrd   the guest's kernel and initramfs
#   MIGRATE, QMP     scripts/vm-migrate and scripts/vm/qmp.py
# and the guest's counter on its console:
#   last_n FILE...           the last counter value printed (empty: none)
#   wait_n MIN SECONDS FILE...   until it reaches MIN; fails on timeout or
#                            when the guest printed a FAIL line
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

last_n () {
  cat "$@" 2>/dev/null | grep -a -o 'xnbd-vm: n=[0-9]* ' | tail -n 1 | sed 's/.*n=//; s/ //' || true
}
wait_n () {  # wait_n MIN SECONDS FILE...
  local min=$1 secs=$2 i n
  shift 2
  for (( i = 0; i < secs * 10; i++ )); do
    n=$(last_n "$@")
    [ -n "$n" ] && [ "$n" -ge "$min" ] && return 0
    ! cat "$@" 2>/dev/null | grep -a -q 'xnbd-vm: FAIL' || break
    sleep 0.1
  done
  tail -n 5 "$@" >&2 || true
  fail "the guest's counter did not reach $min in $secs s (last: ${n:-none})"
}
