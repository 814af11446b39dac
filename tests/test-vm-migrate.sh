#!/usr/bin/env bash
# A whole VM (RAM and disk) moves through scripts/vm-migrate from site A to
# site B, then on from B to site C, all on this host over unix sockets.
# The first hop pre-copies (--precopy): what B copied while the VM still
# ran at A is kept only where it matches A's digests once the VM stopped.
# The second hop starts from what the first left (RAM on the nbdfuse file,
# disk on the detached proxy) and gives C's RAM proxy a seed: A's RAM as
# the first hop left it (pages must come from it).  The guest
# (scripts/vm/guest.sh) proves its integrity: its counter goes on by one
# across both moves (no reset, no jump back), no checksum of its RAM or
# disk data fails, before or after the detaches, and after a further period
# at C, C's disk and RAM images hold exactly what the guest last wrote.
# Also checked by vm-migrate at each switch-over: nothing at the new site
# read the RAM file before the VM stopped at the old one.
source "$(dirname "$0")/functions.sh"
source "$XNBD_SRC/tests/vm-common.sh"
accel=${VM_ACCEL:-tcg}

vm_args () {  # the machine both sites run; RAM backend and disk added per site
  echo -accel "$accel" -m 128M -smp 1 -nodefaults -display none -no-reboot \
    -machine pc,memory-backend=ram0 -kernel "$kernel" -initrd "$initrd"
}
APPEND="console=ttyS0 panic=-1 quiet"

# A VM whose RAM is not a shared file gets a clear refusal, and nothing is
# left behind (a QEMU without a kernel is enough: it runs its firmware).
refused () {  # refused WHAT EXPECTED-TEXT QEMU-MEMORY-ARGS...
  local what=$1 want=$2 d=$TESTDIR/refused-$1 out pid
  shift 2
  mkdir -p "$d"
  START_PIDFILE_OPT=-pidfile start_server "$(command -v qemu-system-x86_64)" -accel tcg -m 16M -nodefaults \
    -display none "$@" -qmp "unix:$d/qmp.sock,server=on,wait=off"
  pid=$SERVER_PID
  wait_for test -S "$d/qmp.sock"
  truncate -s 1M "$d/disk.img"
  if out=$("$MIGRATE" --xnbd-bin "$XNBD_BUILD" --a-qmp "$d/qmp.sock" --a-ram "$d/ram" --a-disk "$d/disk.img" \
      --work "$d/b" -- qemu-system-x86_64 -object "memory-backend-file,id=m,size=16M,mem-path=@RAM@,share=on" \
      -machine pc,memory-backend=m -drive "file=@DISK@,format=raw" 2>&1); then
    fail "vm-migrate accepted a VM with $what"
  fi
  grep -q -- "$want" <<<"$out" || fail "vm-migrate's refusal of $what does not say '$want': $out"
  [ ! -e "$d/b/ram.img" ] && [ ! -e "$d/b/qemu.pid" ] || fail "vm-migrate left B's state behind ($what)"
  stop_server "$pid" >/dev/null || true
}
refused ram-backend "not a memory-backend-file" -object memory-backend-ram,id=m,size=16M -machine pc,memory-backend=m
refused private "share=off" -object "memory-backend-file,id=m,size=16M,mem-path=$TESTDIR/private.ram" -machine pc,memory-backend=m
refused no-backend "memory-backend-file,id=ram0" -machine pc

a=$TESTDIR/a b=$TESTDIR/b c=$TESTDIR/c
mkdir -p "$a" "$b" "$c"
truncate -s 16M "$a/disk.img"
# shellcheck disable=SC2046  # vm_args is a word list
START_PIDFILE_OPT=-pidfile start_server "$(command -v qemu-system-x86_64)" $(vm_args) -append "$APPEND" \
  -object "memory-backend-file,id=ram0,size=128M,mem-path=$a/ram,share=on" \
  -drive "file=$a/disk.img,format=raw,if=virtio" \
  -serial "file:$a/console" -qmp "unix:$a/qmp.sock,server=on,wait=off"
wait_n 3 120 "$a/console"

# hop NAME FROM TO [vm-migrate options...]: the VM moves from site FROM to
# site TO, then runs on there for 6 more rounds, after the detach.
hop () {
  local name=$1 from=$2 to=$3 t0 t1 out n
  shift 3
  cleanup_fn "$MIGRATE" --stop "$to"
  t0=$(date +%s%N)
  # shellcheck disable=SC2046
  out=$(VM_MIGRATE_TRACE=${VM_MIGRATE_TRACE:-} "$MIGRATE" --xnbd-bin "$XNBD_BUILD" --a-qmp "$from/qmp.sock" \
      --work "$to" --timeout 60 "$@" -- \
      qemu-system-x86_64 $(vm_args) -append "$APPEND" \
      -object "memory-backend-file,id=ram0,size=128M,mem-path=@RAM@,share=on" \
      -drive "file=@DISK@,format=raw,if=virtio" -serial "file:$to/console" 2>&1) ||
    { echo "$out" >&2; fail "vm-migrate failed ($name)"; }
  t1=$(date +%s%N)
  echo "$out"
  echo "$name: vm-migrate took $(( (t1 - t0) / 1000000 )) ms"
  grep -q 'qemu: downtime [0-9]* ms' <<<"$out" || fail "vm-migrate reported no downtime ($name)"
  grep -q '"postmigrate"' <<<"$("$QMP" "$from/qmp.sock" query-status)" ||
    fail "the VM at the old site is not in postmigrate after $name"
  n=$(last_n "$a/console" "$b/console" "$c/console")
  wait_n "$(( n + 6 ))" 60 "$a/console" "$b/console" "$c/console"
}

# First hop: A's RAM file and disk image, served by vm-migrate, copied to
# B first while the VM runs at A (--precopy): B keeps only the pages and
# blocks that still match A's digests after the VM stopped there.
hop first "$a" "$b" --a-ram "$a/ram" --a-disk "$a/disk.img" --precopy
# Second hop, from B's FUSE-mapped RAM and its disk proxy (what a VM moved
# by vm-migrate runs on), with A's RAM as left by the first hop as the
# RAM proxy's seed: most pages are still the same.
hop second "$b" "$c" --a-ram "$b/mnt/ram" --a-disk-uri "nbd+unix:///?socket=$b/disk.sock" --seed "$a/ram"
"$QMP" "$c/qmp.sock" stop >/dev/null
"$MIGRATE" --stop "$c"
"$MIGRATE" --stop "$b"

python3 - "$a/console" "$b/console" "$c/console" "$c/disk.img" "$c/ram.img" "$b/report.json" "$c/report.json" <<'PY'
import hashlib, json, re, sys
acon, bcon, ccon, disk, ram, report1, report2 = sys.argv[1:]
name = "after two hops"
def fail(msg):
    print("FAIL: %s: %s" % (name, msg), file=sys.stderr)
    sys.exit(1)
texts = [open(f, "rb").read().decode("ascii", "replace") for f in (acon, bcon, ccon)]
text = "".join(texts)         # a line cut by a move goes on at the next site
lines = [l[l.index("xnbd-vm: ") + 9:] for l in text.splitlines() if "xnbd-vm: " in l]
fails = [l for l in lines if l.startswith("FAIL")]
if fails:
    fail("the guest reported: %s" % fails[:5])
ns, ups = [], []
for l in lines:
    m = re.fullmatch(r"n=(\d+) up=([\d.]+)", l)
    if m:
        ns.append(int(m.group(1))); ups.append(float(m.group(2)))
if len(ns) < 10:
    fail("too few counter lines: %d" % len(ns))
for i in range(1, len(ns)):
    if ns[i] != ns[i - 1] + 1 or ups[i] < ups[i - 1]:
        fail("counter went from n=%d up=%s to n=%d up=%s" % (ns[i-1], ups[i-1], ns[i], ups[i]))
for site, t in zip("BC", texts[1:]):
    nb = len([l for l in t.splitlines() if re.search(r"xnbd-vm: n=\d+ up=", l)])
    if nb < 6:
        fail("only %d counter lines at %s" % (nb, site))
# Disk: every 64 KiB block holds the generation last announced for it (the
# block announced last may still hold the one before, if B stopped the VM
# between the announcement and the write).
hist = {}
last_k = None
for l in lines:
    m = re.fullmatch(r"disk k=(\d+) g=(\d+) sha=([0-9a-f]{64})", l)
    if m:
        k = int(m.group(1)); hist.setdefault(k, []).append(m.group(3)); last_k = k
with open(disk, "rb") as f:
    d = f.read()
for k, shas in hist.items():
    got = hashlib.sha256(d[k * 65536:(k + 1) * 65536]).hexdigest()
    ok = [shas[-1]] + ([shas[-2]] if k == last_k and len(shas) > 1 else [])
    if got not in ok:
        fail("B's disk block %d differs from what the guest last wrote" % k)
# RAM: find the guest's chunk pages in B's RAM image; the generation last
# announced for each chunk is whole there and has the announced checksum.
want = {}
for l in lines:
    m = re.fullmatch(r"ram c=(\d+) g=(\d+) sha=([0-9a-f]{64})", l)
    if m:
        want[int(m.group(1))] = (int(m.group(2)), m.group(3))
pages = {}
with open(ram, "rb") as f:
    mem = f.read()
for off in range(0, len(mem), 4096):
    if mem.startswith(b"xnbd-ram c=", off):
        m = re.match(rb"xnbd-ram c=(\d+) g=(\d+) p=(\d+)", mem[off:off + 64])
        if m:
            key = tuple(int(x) for x in m.groups())
            page = mem[off:off + 4096]
            if pages.setdefault(key, page) != page:
                fail("two different copies of RAM page %s" % (key,))
for c, (g, sha) in want.items():
    missing = [p for p in range(64) if (c, g, p) not in pages]
    if missing:
        fail("chunk %d generation %d: %d pages not in B's RAM image" % (c, g, len(missing)))
    h = hashlib.sha256(b"".join(pages[(c, g, p)] for p in range(64))).hexdigest()
    if h != sha:
        fail("chunk %d generation %d in B's RAM image differs from what the guest wrote" % (c, g))
print("guest counter %d..%d without a gap; C's disk (%d blocks) and RAM (%d chunks) as last written"
      % (ns[0], ns[-1], len(hist), len(want)))
for hop, report in (("first", report1), ("second", report2)):
    r = json.load(open(report))
    b = r["ram"]["bytes"]
    print("%s hop: downtime %s ms (A stopped -> B running %s ms), detach %s ms after; RAM fetched %d B, "
          "from seeds %d B, zero %d B; disk fetched %d B"
          % (hop, r["downtime_ms"], r["switch_ms"], r["detach_ms"], b["fetched"], b["seeded"],
             b["zero_skipped"], r["disk"]["bytes"]["fetched"]))
    if r["ram"]["blocks"]["missing"] != 0 or r["disk"]["blocks"]["missing"] != 0:
        fail("blocks still missing at the %s hop's detach" % hop)
    if hop == "second" and b["seeded"] <= 0:
        fail("no RAM page came from the seed in the second hop")
    if hop == "first" and (r.get("precopy_fetched", 0) <= 0 or b["seeded"] <= 0):
        fail("--precopy: %d bytes pre-copied, %d B of RAM kept from it (both must be > 0)"
             % (r.get("precopy_fetched", 0), b["seeded"]))
PY
stop_server "$SERVER_PID" >/dev/null || true
echo OK
