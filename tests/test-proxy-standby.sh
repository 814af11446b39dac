#!/usr/bin/env bash
# --standby (live migration): while the VM may still write at the source,
# reads through the proxy pass through and nothing is kept (so nothing can
# go stale), the background copy is refused; the first write at the
# destination (or `activate`) ends standby, and the migration then
# completes with the source's latest data.
source "$(dirname "$0")/functions.sh"
requires qemu-io qemu-img

img=$TESTDIR/src.img
make_image "$img" 16M 11
cp "$img" "$TESTDIR/model.img"
start_server xnbd-server -u "$TESTDIR/src.sock" "$img"        # the VM at A writes here
src="nbd+unix:///?socket=$TESTDIR/src.sock"
d=$TESTDIR/dst
mkdir -p "$d"
start_proxy --target "$src" --cache "$d/cache" --bitmap "$d/bm" --control "$d/ctl" \
    -u "$d/px.sock" --standby
px="nbd+unix:///?socket=$d/px.sock"
[ "$(proxy_status "$d/ctl" standby)" = True ] || [ "$(proxy_status "$d/ctl" standby)" = true ] ||
  fail "status does not show standby: $(ctl "$d/ctl" status)"

# A read at B (QEMU probing the disk) passes through and is not kept.
qio "$px" "read 1M 64k"
[ "$(proxy_status "$d/ctl" blocks.present)" = 0 ] || fail "standby read kept blocks"
(( $(proxy_status "$d/ctl" fetches.ondemand) >= 1 )) || fail "standby read did not fetch"

# The VM at A writes that range afterwards; B must see the new data.
qio "$src" "write -P 0x11 1M 64k"
qio "$TESTDIR/model.img" "write -P 0x11 1M 64k"
qio "$px" "read -P 0x11 1M 64k"
[ "$(proxy_status "$d/ctl" blocks.present)" = 0 ] || fail "standby read kept blocks"

# No background copy before the switch-over.
ctl_err "$d/ctl" cache-all
grep -q "standby" <<<"$CTL_ERROR" || fail "cache-all refusal does not mention standby: $CTL_ERROR"

# Switch-over: the VM's first write at B ends standby.
qio "$px" "write -P 0x22 3M 8k"
qio "$TESTDIR/model.img" "write -P 0x22 3M 8k"
st=$(proxy_status "$d/ctl" standby)
[ "$st" = False ] || [ "$st" = false ] || fail "first write did not activate (standby=$st)"
qio "$px" "read -P 0x11 1M 64k"
(( $(proxy_status "$d/ctl" blocks.present) >= 16 + 2 )) || fail "blocks are not kept after activation"

ctl_ok "$d/ctl" cache-all
wait_state "$d/ctl" complete 60
qemu-img compare -q -f raw -F raw "$TESTDIR/model.img" "$px" || fail "migrated disk differs from the model"
echo "standby: pass-through before the switch-over, kept and complete after it"
