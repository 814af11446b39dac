#!/usr/bin/env bash
# wan-emu's netem branch, on a kernel without sch_netem (CI's).
#
# (a) Forced --mode netem where the kernel has no sch_netem: `up` fails with
#     a message that says so, and leaves nothing behind (no namespaces, no
#     relay, no state).
# (b) The netem set-up itself, with a stand-in `tc` first in PATH that
#     accepts netem (and the tbf hung under it) and passes every other call
#     to the real tc: `up --rtt 40ms --rate 100mbit --jitter 2ms --loss 0.5%`
#     reports mode netem, starts no relay, asks each namespace's wan0 for
#     netem with half the RTT, the jitter, the loss and a delay line of two
#     RTTs of full-size packets, with tbf at the rate under it; relay-addr
#     names the other site's address directly; `down` removes everything.
# What (b) cannot show is the kernel's delay itself: test-wan-emu measures
# that in relay mode, and does in netem mode on a kernel that has it.
source "$(dirname "$0")/functions.sh"
requires ip tc

WAN_EMU=$XNBD_SRC/scripts/wan-emu/wan-emu
probe_ns=xnbd-probe-$$
if [ "$(id -u)" -ne 0 ] || ! ip netns add "$probe_ns" 2>/dev/null; then
  skip "cannot create network namespaces here (needs root and CONFIG_NET_NS)"
fi
# Whether this kernel has sch_netem, asked in the probe namespace.
cleanup_fn ip netns del "$probe_ns"      # (errors are ignored at cleanup)
ip -n "$probe_ns" link add d0 type veth peer name d1
have_netem=0
if ip netns exec "$probe_ns" tc qdisc add dev d0 root netem delay 1ms 2>/dev/null; then
  have_netem=1
fi
ip netns del "$probe_ns"

export WAN_EMU_STATE=$TESTDIR/state
name=n$$
wan () { "$WAN_EMU" --name "$name" "$@"; }
cleanup_fn "$WAN_EMU" --name "$name" down

nothing_left () {   # WHAT
  local ns
  for ns in "xnbd-$name-src" "xnbd-$name-dst"; do
    if ip netns list | grep -qw -- "$ns"; then fail "$1: namespace $ns is still there"; fi
  done
  if pgrep -f -- "wan-relay.*$WAN_EMU_STATE" >/dev/null; then fail "$1: a relay is still running"; fi
  if [ -n "$(ls -A "$WAN_EMU_STATE" 2>/dev/null)" ]; then
    fail "$1: state left in $WAN_EMU_STATE: $(ls -A "$WAN_EMU_STATE")"
  fi
}

# ------------------------------------------------------------------ (a)
if [ "$have_netem" = 0 ]; then
  st=0
  out=$(wan up --rtt 40ms --rate 100mbit --mode netem 2>&1) || st=$?
  echo "$out"
  [ "$st" -ne 0 ] || fail "up --mode netem succeeded on a kernel without sch_netem"
  grep -q "no sch_netem" <<<"$out" || fail "up --mode netem failed without saying why: $out"
  nothing_left "after a failed up --mode netem"
else
  echo "(a) skipped: this kernel has sch_netem"
fi

# ------------------------------------------------------------------ (b)
stub=$TESTDIR/stub
mkdir -p "$stub"
real_tc=$(command -v tc)
cat >"$stub/tc" <<EOF
#!/usr/bin/env bash
# Stand-in: records every call; accepts netem and what hangs under it.
echo "\$*" >> "$TESTDIR/tc.log"
case " \$* " in
  *" netem "*|*" parent 1:1 "*) exit 0 ;;
  *" qdisc del "*" root"*) exit 0 ;;
esac
exec "$real_tc" "\$@"
EOF
chmod +x "$stub/tc"
: > "$TESTDIR/tc.log"
out=$(PATH=$stub:$PATH wan up --rtt 40ms --rate 100mbit --jitter 2ms --loss 0.5% --forward 5001 2>&1) ||
  fail "up with a netem-capable tc failed: $out"
echo "$out"
grep -q "mode netem" <<<"$out" || fail "up did not choose netem where tc accepts it: $out"
echo "tc calls:"; cat "$TESTDIR/tc.log"
# 100 Mbit/s x 40 ms x 2 / 1500-byte packets = 666, raised to at least 1000.
want_netem="qdisc replace dev wan0 root handle 1: netem delay 20000us 2000us loss 0.5% limit 1000"
[ "$(grep -cxF -- "$want_netem" "$TESTDIR/tc.log")" -eq 2 ] ||
  fail "expected '$want_netem' once per namespace"
[ "$(grep -c -- "qdisc add dev wan0 parent 1:1 handle 10: tbf rate 100000000bit" "$TESTDIR/tc.log")" -eq 2 ] ||
  fail "expected tbf at 100 Mbit/s under netem once per namespace"
if pgrep -f -- "wan-relay.*$WAN_EMU_STATE" >/dev/null; then fail "a relay runs in netem mode"; fi
[ "$(wan relay-addr 5001)" = 10.254.0.1:5001 ] ||
  fail "relay-addr in netem mode is '$(wan relay-addr 5001)', expected the source site's address"
[ "$(wan relay-addr --reverse 5001)" = 10.254.0.2:5001 ] ||
  fail "relay-addr --reverse in netem mode is '$(wan relay-addr --reverse 5001)'"
wan exec dst ip -br addr show dev wan0 | grep -q 10.254.0.2 || fail "dst has no 10.254.0.2 on wan0"
PATH=$stub:$PATH wan down || fail "down failed"
nothing_left "after down"
echo OK
