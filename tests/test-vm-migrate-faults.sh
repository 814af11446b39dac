#!/usr/bin/env bash
# A whole VM moves through scripts/vm-migrate from site A to site B (one
# host, unix sockets) under the two faults of issue 13, in one migration:
#
#  (a) the link to A (a relay in front of A's xnbd-server, both exports)
#      is cut for 10 s during the post-copy phase: once B's proxies are
#      active and RAM pages are still missing.  The proxies lose their
#      connections (checked), reconnect when the link is back, and the
#      migration completes and detaches.
#  (b) B's RAM proxy has as seed the RAM of a VM running at B (the seed
#      VM, the same guest: its kernel and its 8 MiB of static data are the
#      moving VM's too).  The seed VM keeps running, and once the proxy has
#      indexed it, every page of that static data in the seed is
#      overwritten (its first line "xnbd-static ..." found in the seed's
#      RAM file): the index still points at those pages, and the proxy must
#      notice (it verifies each seed block by SHA-256) and fetch them from
#      A instead.
#
# The guest (scripts/vm/guest.sh, ticking every 10 ms) proves it: no
# checksum of its RAM or disk fails, before or after the move, its counter
# and its ticks go on by one across the move, and it runs 9 more rounds at
# B after the detach, re-verifying all 8 pieces of its static data there.
source "$(dirname "$0")/functions.sh"
source "$XNBD_SRC/tests/vm-common.sh"
STAMP=$XNBD_SRC/scripts/vm/console-stamp.py
CHECK=$XNBD_SRC/scripts/vm/console-check.py
QEMU=$(command -v qemu-system-x86_64)
APPEND="console=ttyS0 panic=-1 quiet xnbd.tick=10"
CUT_S=10
RELAY_RATE=$((48 * 1024 * 1024))    # bytes/s from A: the post-copy takes seconds

VM=(-accel tcg -m 128M -smp 1 -nodefaults -display none -no-reboot
    -machine pc,memory-backend=ram0 -kernel "$kernel" -initrd "$initrd" -append "$APPEND")
# stamp NAME SOCKET: the console of a VM, stamped, to $TESTDIR/NAME.console.
stamp () {
  "$STAMP" "$2" "$TESTDIR/$1.console" 120 2>"$TESTDIR/$1.stamp.server.log" &
  cleanup_fn kill "$!"
}

# fail_b MSG: fail, with the end of vm-migrate's logs at B.
fail_b () {
  local f
  for f in "$TESTDIR/migrate.out" "$b"/vm/ram-proxy.log "$b"/vm/disk-proxy.log "$b"/vm/nbdfuse.log "$b"/vm/qemu-b.log; do
    [ -s "$f" ] || continue
    echo "---- ${f#"$TESTDIR"/} (last 30 lines) ----" >&2
    tail -n 30 "$f" >&2
  done
  fail "$@"
}

a=$TESTDIR/a b=$TESTDIR/b s=$TESTDIR/s
mkdir -p "$a" "$b" "$s"
truncate -s 16M "$a/disk.img" "$s/disk.img"

# The seed VM at B, and the VM to move at A.
START_PIDFILE_OPT=-pidfile start_server "$QEMU" "${VM[@]}" \
  -object "memory-backend-file,id=ram0,size=128M,mem-path=$s/ram,share=on" \
  -drive "file=$s/disk.img,format=raw,if=virtio" -serial "file:$s/console"
seed_vm=$SERVER_PID
stamp a "$a/con.sock"
START_PIDFILE_OPT=-pidfile start_server "$QEMU" "${VM[@]}" \
  -object "memory-backend-file,id=ram0,size=128M,mem-path=$a/ram,share=on" \
  -drive "file=$a/disk.img,format=raw,if=virtio" \
  -chardev "socket,id=con,path=$a/con.sock,server=on,wait=on" -serial chardev:con \
  -qmp "unix:$a/qmp.sock,server=on,wait=off"
a_vm=$SERVER_PID
wait_n 1 120 "$TESTDIR/a.console"
wait_n 1 120 "$s/console"
echo "$SECONDS s: both VMs run"

# A's xnbd-server, and the link to it: the relay.
start_server xnbd-server -r -u "$a/srv.sock" -e "ram=$a/ram" -e "disk=$a/disk.img"
python3 "$XNBD_SRC/tests/tools/cut-relay.py" "$a/link.sock" "$a/srv.sock" "$a/link.ready" "$RELAY_RATE" \
  2>"$TESTDIR/relay.server.log" &
relay=$!
cleanup_fn kill "$relay"
wait_for test -s "$a/link.ready"

# B's QEMU command is this wrapper: vm-migrate runs it once the proxies
# are up (the RAM proxy has indexed the seed); it overwrites the seed's
# static data pages, then runs QEMU.
cat > "$TESTDIR/qemu-b" <<EOF
#!/bin/sh
python3 - "$s/ram" > "$TESTDIR/scribbled" <<'PY' || exit 1
import mmap, sys
with open(sys.argv[1], "r+b") as f:
    m = mmap.mmap(f.fileno(), 0)
    n, pos = 0, 0
    while True:
        pos = m.find(b"xnbd-static s=", pos)
        if pos < 0:
            break
        if pos % 4096 == 0:
            m[pos:pos + 4096] = b"xnbd-scribbled".ljust(4096, b"!")
            n += 1
        pos += 14
    m.flush()
print(n)
PY
exec "$QEMU" "\$@"
EOF
chmod +x "$TESTDIR/qemu-b"

stamp b "$b/con.sock"
cleanup_fn "$MIGRATE" --stop "$b/vm"
"$MIGRATE" --xnbd-bin "$XNBD_BUILD" --a-qmp "$a/qmp.sock" \
    --a-ram-uri "nbd+unix:///ram?socket=$a/link.sock" --a-disk-uri "nbd+unix:///disk?socket=$a/link.sock" \
    --seed "$s/ram" --source-timeout 120 --work "$b/vm" --timeout 60 -- \
    "$TESTDIR/qemu-b" "${VM[@]}" \
    -object "memory-backend-file,id=ram0,size=128M,mem-path=@RAM@,share=on" \
    -drive "file=@DISK@,format=raw,if=virtio" \
    -chardev "socket,id=con,path=$b/con.sock,server=on,wait=on" -serial chardev:con \
    >"$TESTDIR/migrate.out" 2>&1 &
mig=$!
cleanup_fn kill "$mig"
cleanup_fn kill -USR2 "$relay"      # first of all: the link back, so that B stops cleanly

# (a) The post-copy phase: the RAM proxy is active, pages are missing.
status () { "$XNBD_BUILD/xnbd-ctl" -c "$b/vm/ram.ctl" status --json 2>/dev/null; }
active=
for (( i = 0; i < 600; i++ )); do
  st=$(status) || st=
  if [ -n "$st" ] && [ "$(json_get "$st" standby)" = false ]; then active=1; break; fi
  kill -0 "$mig" 2>/dev/null || { cat "$TESTDIR/migrate.out" >&2; fail_b "vm-migrate ended before the switch-over"; }
  sleep 0.02
done
[ -n "$active" ] || fail_b "the RAM proxy was not activated in 12 s"
kill -USR1 "$relay"
t_cut=$(date +%s.%N)
missing=$(json_get "$st" blocks.missing)
[ "$missing" -gt 0 ] || fail_b "the RAM proxy had no missing block when the link was cut (the copy outran the relay's rate cap)"
echo "$SECONDS s: link cut at the switch-over + $(json_get "$st" bytes.fetched) bytes fetched; $missing RAM blocks missing"
# The proxies notice: no connection to A is up.
lost=
for (( i = 0; i < 50; i++ )); do
  st=$(status)
  if [ "$(json_get "$st" connections.up)" = 0 ]; then lost=1; break; fi
  sleep 0.1
done
[ -n "$lost" ] || fail_b "the RAM proxy still reports a connection to A 5 s into the cut: $st"
# The rest of the deliberate 10 s fault window.
rest=$(awk -v t="$t_cut" -v now="$(date +%s.%N)" -v c="$CUT_S" 'BEGIN { r = c - (now - t); if (r < 0) r = 0; printf "%.2f", r }')
sleep "$rest"
st=$(status)
[ "$(json_get "$st" blocks.missing)" -gt 0 ] || fail_b "no RAM block missing at the end of the cut: the link was not cut"
kill -0 "$mig" || fail_b "vm-migrate ended during the cut"
kill -USR2 "$relay"
echo "$SECONDS s: link back after ${CUT_S} s; $(json_get "$st" blocks.missing) RAM blocks still missing"

# The migration completes and detaches.
done_=
for (( i = 0; i < 900; i++ )); do
  kill -0 "$mig" 2>/dev/null || { done_=1; break; }
  sleep 0.1
done
[ -n "$done_" ] || fail_b "vm-migrate did not end 90 s after the link came back"
rc=0; wait "$mig" || rc=$?
cat "$TESTDIR/migrate.out"
echo "$SECONDS s: vm-migrate ended"
[ "$rc" = 0 ] || fail_b "vm-migrate failed (status $rc) after the cut"

scribbled=$(cat "$TESTDIR/scribbled")
[ "$scribbled" -ge 2048 ] || fail_b "only $scribbled static pages found in the seed VM's RAM (expected 8 MiB of them at least)"
echo "overwrote $scribbled static data pages in the seed VM's RAM after the proxy indexed it"

# At least 9 rounds at B (all 8 static pieces re-verified there, after
# the seed changed), 2 of them after the detach.
n=$(last_n "$TESTDIR/a.console" "$TESTDIR/b.console")
nb=$(grep -a -c 'xnbd-vm: n=' "$TESTDIR/b.console" || true)
wait_n "$(( n + (nb >= 7 ? 2 : 9 - nb) ))" 120 "$TESTDIR/a.console" "$TESTDIR/b.console"
echo "$SECONDS s: 9 rounds at B"
server_alive "$seed_vm" || fail_b "the seed VM stopped"
"$QMP" "$b/vm/qmp.sock" stop >/dev/null
"$MIGRATE" --stop "$b/vm" >/dev/null
stop_server "$a_vm" >/dev/null || true

proof=$("$CHECK" "$TESTDIR/a.console" "$TESTDIR/b.console") || { echo "$proof" >&2; fail_b "the guest's proof fails"; }
echo "guest: $proof"
python3 - "$proof" "$b/vm/report.json" <<'PY'
import json, sys
p, r = json.loads(sys.argv[1]), json.load(open(sys.argv[2]))
def fail(msg):
    print("FAIL: %s" % msg, file=sys.stderr)
    sys.exit(1)
if p["rounds"][1] < 9:  # (static piece n % 8 is checked in round n)
    fail("only %d rounds at B" % p["rounds"][1])
if p["ticks"][1] < 10:
    fail("only %d ticks at B" % p["ticks"][1])
for k in ("ram", "disk"):
    if r[k]["blocks"]["missing"] != 0:
        fail("%s blocks missing at the detach" % k)
b = r["ram"]["bytes"]
if b["seeded"] <= 0:
    fail("no RAM page came from the seed VM")
print("downtime %s ms (QEMU), longest gap in the guest's ticks %s ms (the cut: pages waited); "
      "RAM fetched %d B, from the seed %d B, zero %d B; detach %s ms after the switch-over"
      % (r["downtime_ms"], p.get("max_gap_ms"), b["fetched"], b["seeded"], b["zero_skipped"], r["detach_ms"]))
PY
echo OK
