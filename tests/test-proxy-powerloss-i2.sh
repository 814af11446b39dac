#!/usr/bin/env bash
# Invariant I2 (bit implies data; flushed data survives a crash) of
# xnbd-proxy across a POWER CUT: everything not yet synced is lost.
#
# test-proxy-crash-i2.sh kills the proxy with SIGKILL, which keeps the page
# cache, so it cannot see a missing fsync.  Here the proxy runs under the
# LD_PRELOAD shim tests/tools/preload-powerloss.c, which journals every
# change to the cache image and the bitmap file (data included) and every
# sync that completed.  tests/tools/powerloss-replay then rebuilds both files
# as a disk may hold them after a power cut at the crash instant: every
# change a completed sync covered is there; each other change is there or
# not, at random (seeded), page by page -- or, for one rebuild, all of them
# are gone.
#
# Each run: one xnbd-server serves a 16 MiB source image.  A fresh proxy
# (it creates its cache and bitmap) runs under the shim with --cache-all and
# a background rate cap, so the copy is under way, while crashload (see
# test-proxy-crash-i2.sh) writes stamped data, FLUSHes every few writes and
# journals what was acknowledged.  The crash comes at a point reached by
# condition: "flush:N", once crashload has seen N flushes complete, the
# test tells the shim's crash thread, which takes the journal lock and kills
# the proxy (so no change is half journalled); "bitmap-sync:N", the thread
# whose fdatasync of the bitmap file is the N-th to complete kills the
# proxy at once (the instant bits just became durable: if their blocks' data
# was not synced first, it is lost).  Then:
#   1. the journal is complete: replaying every change gives exactly the
#      files the killed proxy left (a change made through a path the shim
#      does not wrap would show here);
#   2. the files exist after a power cut: a file the proxy created needs a
#      fsync of its directory after the creation (a lost name is reported
#      and fails the test; the checks below then assume names survive, as
#      ext4 and xfs give, so they still run);
#   3. for the "synced" rebuild and PL_SEEDS random ones, a proxy started
#      WITHOUT the shim on the rebuilt files must serve: every write
#      acknowledged before a completed flush (or with FUA), else the
#      source's data or a write the client issued (crashload verify; never
#      zeros or garbage where the source has data);
#   4. that proxy then completes a cache-all; a second full read must equal
#      the first, and after it stops the cache image itself must hold
#      exactly what was read.
# A failing rebuild prints crashload's MISMATCH lines and keeps the journal
# and the rebuilt files in test-logs/; the others still run, and the test
# fails at the end.
#
# ASan: the shim is never instrumented (see the Makefile).  An ASan-built
# proxy needs libasan first in the library list, so when the proxy links
# libasan, the test preloads it ahead of the shim.
#
# Environment: PL_SEED=N reproduces (crashload seeds and replay seeds),
# PL_POINTS="flush:N bitmap-sync:N ..." the crash points, one run each
# (default "flush:8 flush:60 bitmap-sync:12 bitmap-sync:40"), PL_SEEDS=N
# random rebuilds per run (default 4).
source "$(dirname "$0")/functions.sh"
requires qemu-img cmp python3 ldd

SHIM=$XNBD_BUILD/tests/preload-powerloss.so
REPLAY=$XNBD_SRC/tests/tools/powerloss-replay
CRASHLOAD=$XNBD_BUILD/tests/crashload
SOCKCMD=$XNBD_BUILD/tests/sockcmd
for f in "$SHIM" "$CRASHLOAD" "$SOCKCMD"; do
  [ -e "$f" ] || fail "$f not built (run make)"
done
[ -x "$REPLAY" ] || fail "$REPLAY is missing or not executable"
# shellcheck disable=SC2034  # read by wait_for in functions.sh
WAIT_TRIES=300              # conditions get up to 30 s on a loaded machine

seed=${PL_SEED:-$(( $(date +%s%N) / 1000 % 1000000 ))}
crash_points=${PL_POINTS:-flush:8 flush:60 bitmap-sync:12 bitmap-sync:40}
nseeds=${PL_SEEDS:-4}
echo "seed $seed, crash points $crash_points, $nseeds random rebuilds each (reproduce with PL_SEED=$seed)"

preload=$SHIM
asan=$(ldd "$XNBD_BUILD/xnbd-proxy" | awk '/libasan\.so/ { print $3; exit }')
if [ -n "$asan" ]; then
  preload=$asan:$SHIM
  echo "xnbd-proxy is ASan-built: preloading $asan before the shim"
fi

img=$TESTDIR/source.img
work=$TESTDIR/work             # the files the shimmed proxy changes
orig=$TESTDIR/orig             # those files before it started (none)
cache=$work/cache.img
bitmap=$work/cache.bitmap
ctl=$TESTDIR/ctl.sock
psock=$TESTDIR/proxy.sock
cjournal=$TESTDIR/crashload.journal
pjournal=$TESTDIR/powerloss.journal
fifo=$TESTDIR/crash.fifo
dump=$TESTDIR/dump.img
puri=$(nbd_unix_uri "$psock")
mkdir -p "$work" "$orig"
mkfifo "$fifo"

make_image "$img" 16M
img_sha=$(sha "$img")
start_server xnbd-server -u "$TESTDIR/source.sock" "$img"
source_pid=$SERVER_PID
suri=$(nbd_unix_uri "$TESTDIR/source.sock")

status () { "$SOCKCMD" -t 10 "$ctl" status "$@"; }
flushes_seen () {
  local n
  n=$(grep -c '^F ' "$cjournal" 2>/dev/null) || n=0
  [ "$n" -ge "$1" ]
}

proxy_up () {   # PROGRAM CACHE BITMAP [ARGS...]
  local p=$1 c=$2 b=$3; shift 3
  start_server "$p" --target "$suri" --cache "$c" --bitmap "$b" \
    --control "$ctl" -u "$psock" --persist-interval 50 "$@"
  PROXY_PID=$SERVER_PID
  wait_state "$ctl" proxying 30
}
# xnbd-proxy under the shim: the same PID (exec), the shim's environment
# (only the proxy's: the status polls must not load it).  $1: the value of
# XNBD_PL_CRASH_AFTER, or empty.
shimmed=$TESTDIR/xnbd-proxy-shimmed
write_shimmed () {
  cat >"$shimmed" <<EOF
#!/bin/sh
exec env LD_PRELOAD='$preload' XNBD_PL_FILES='$cache:$bitmap' \\
  XNBD_PL_JOURNAL='$pjournal' XNBD_PL_CRASH='$fifo' XNBD_PL_CRASH_AFTER='$1' \\
  '$XNBD_BUILD/xnbd-proxy' "\$@"
EOF
  chmod +x "$shimmed"
}
shim_dead () { ! server_alive "$shim_pid"; }

failures=0 name_defects=0
run=0
for point in $crash_points; do
  run=$(( run + 1 ))
  rm -f "$cache" "$bitmap" "$cjournal" "$pjournal" "$dump"
  lseed=$(( seed * 1000 + run ))
  count=${point#*:}
  case "$point" in
    flush:[1-9]*) write_shimmed "" ;;
    bitmap-sync:[1-9]*) write_shimmed "1:$count" ;;  # file 1: the bitmap
    *) fail "PL_POINTS: '$point' is neither flush:N nor bitmap-sync:N" ;;
  esac

  # --bg-rate keeps the background copy going for seconds.
  proxy_up "$shimmed" "$cache" "$bitmap" --cache-all --bg-rate 512K
  shim_pid=$PROXY_PID
  [ -s "$pjournal" ] || fail "run $run: the shim wrote no journal (was it preloaded?)"

  timeout 60 "$CRASHLOAD" write --uri "$puri" --journal "$cjournal" \
    --seed "$lseed" --seconds 30 >"$TESTDIR/write.out" 2>&1 &
  load_pid=$!
  if [ "${point%%:*}" = flush ]; then
    wait_for flushes_seen "$count" || {
      cat "$TESTDIR/write.out" >&2
      fail "run $run: crashload did not see $count flushes complete"
    }
    present=$(status blocks.present) total=$(status blocks.total)
    what="$(grep -c '^F ' "$cjournal") flushes seen by the client, $present of $total blocks present"
    [ "$present" -lt "$total" ] ||
      what+=" (note: the background copy had already finished)"
    # The shim's thread kills the proxy with its journal lock held.
    # shellcheck disable=SC2016  # $1 is the inner shell's
    timeout 10 sh -c 'echo x >"$1"' sh "$fifo" ||
      fail "run $run: could not tell the shim to crash (FIFO $fifo)"
  else
    what="the bitmap's sync number $count completed"
  fi
  wait_for shim_dead || {
    cat "$TESTDIR/write.out" >&2
    cp "$pjournal" "$XNBD_BUILD/test-logs/test-proxy-powerloss-i2.run$run.powerloss-journal" || true
    fail "run $run: the proxy still runs: the crash point $point was not reached (its journal is in test-logs/)"
  }
  st=0; stop_server "$shim_pid" 2>/dev/null || st=$?  # no "Killed" job notice
  [ "$st" -eq 137 ] || fail "run $run: xnbd-proxy exit status $st at the crash (expected 137, SIGKILL)"
  st=0; wait "$load_pid" || st=$?
  [ "$st" -eq 0 ] || {
    cat "$TESTDIR/write.out" >&2
    fail "run $run: crashload write failed (exit $st)"
  }
  echo "run $run: crash when $what; the client had $(grep -c '^F ' "$cjournal") flushes done"

  # 1. The journal holds every change: replaying all of it gives the files
  #    the killed proxy left behind.
  rm -rf "$TESTDIR/all" && mkdir "$TESTDIR/all"
  "$REPLAY" --journal "$pjournal" --orig "$orig" --out "$TESTDIR/all" --mode all \
    >"$TESTDIR/replay.out" 2>&1 || {
    cat "$TESTDIR/replay.out" >&2
    fail "run $run: powerloss-replay could not replay the journal"
  }
  for f in "$cache" "$bitmap"; do
    cmp "$f" "$TESTDIR/all/${f##*/}" || {
      cat "$TESTDIR/replay.out" >&2
      fail "run $run: ${f##*/} after the crash differs from its journal replayed in full: the shim missed a change (a path it does not wrap?)"
    }
  done

  # 2. The files' names: a file the proxy created is there after a power
  #    cut only if its directory was synced after the creation.  A lost
  #    name is reported (and fails the test at the end); the content checks
  #    below then assume names survive (--keep-names: ext4 and xfs commit a
  #    new file's name with its first fsync), so they still run.
  rm -rf "$TESTDIR/names" && mkdir "$TESTDIR/names"
  "$REPLAY" --journal "$pjournal" --orig "$orig" --out "$TESTDIR/names" --mode synced \
    >"$TESTDIR/replay.out" 2>&1 || {
    cat "$TESTDIR/replay.out" >&2
    fail "run $run: powerloss-replay failed"
  }
  for f in "$cache" "$bitmap"; do
    [ -e "$TESTDIR/names/${f##*/}" ] && continue
    echo "run $run: DEFECT: ${f##*/} was created by xnbd-proxy but no fsync of its directory followed: after a power cut the file may be gone (with every flushed write in it)"
    name_defects=$(( name_defects + 1 ))
  done

  # 3-4. Rebuilds as after a power cut, each served by a plain proxy.
  for rs in synced $(seq 1 "$nseeds"); do
    out=$TESTDIR/rebuilt
    rm -rf "$out" && mkdir "$out"
    if [ "$rs" = synced ]; then
      args=(--mode synced) what="unsynced changes all dropped"
    else
      rseed=$(( lseed * 100 + rs ))
      args=(--mode random --seed "$rseed") what="random rebuild, replay seed $rseed"
    fi
    "$REPLAY" --journal "$pjournal" --orig "$orig" --out "$out" --keep-names "${args[@]}" \
      >"$TESTDIR/replay.out" 2>&1 || {
      cat "$TESTDIR/replay.out" >&2
      fail "run $run ($what): powerloss-replay failed"
    }
    proxy_up xnbd-proxy "$out/cache.img" "$out/cache.bitmap"
    rpresent=$(status blocks.present)
    ctl_ok "$ctl" "cache-all" >/dev/null
    st=0
    "$CRASHLOAD" verify --uri "$puri" --journal "$cjournal" --source "$img" \
      --dump "$dump" >"$TESTDIR/verify.out" 2>&1 || st=$?
    if [ "$st" -ne 0 ]; then
      [ "$st" -eq 1 ] || {
        cat "$TESTDIR/verify.out" >&2
        fail "run $run ($what): crashload verify could not check the export (exit $st)"
      }
      echo "run $run ($what) FAILED: I2 broken after a power cut; $rpresent blocks present after restart:"
      cat "$TESTDIR/replay.out" "$TESTDIR/verify.out"
      keepdir=$XNBD_BUILD/test-logs/test-proxy-powerloss-i2.run$run.$rs
      mkdir -p "$keepdir" && cp "$pjournal" "$cjournal" "$out"/* "$keepdir"/ &&
        echo "journals and rebuilt files kept in $keepdir"
      failures=$(( failures + 1 ))
      stop_server "$PROXY_PID" || true
      continue
    fi
    wait_state "$ctl" complete 60
    qemu-img compare -q -f raw -F raw "$dump" "$puri" ||
      fail "run $run ($what): a full read after cache-all completed differs from the verified one"
    stop_ok "$PROXY_PID" "xnbd-proxy on the rebuilt files"
    cmp "$dump" "$out/cache.img" ||
      fail "run $run ($what): the complete cache image differs from what the proxy served"
    v=$(sed -n 's/^verify: sectors: \(.*\); .*/\1/p' "$TESTDIR/verify.out")
    # Pages of unsynced writes the rebuild kept/lost, per file.
    pages=$(sed -n 's/^\([^:]*\): .*pages of unsynced writes applied \([0-9]*\), dropped \([0-9]*\)$/\1 \2 kept \3 lost/p' \
      "$TESTDIR/replay.out" | paste -sd, -)
    echo "run $run ($what): unsynced pages: $pages; $rpresent blocks present after restart; sectors: $v: OK"
  done
  assert_alive "$source_pid"
done

[ "$(sha "$img")" = "$img_sha" ] || fail "I6: the source image changed"
[ "$name_defects" -eq 0 ] || [ "$failures" -ne 0 ] ||
  fail "data checks passed, but $name_defects times a file xnbd-proxy created had no directory fsync after its creation (DEFECT lines above)"
[ "$failures" -eq 0 ] ||
  fail "$failures rebuilds broke I2 after a power cut (MISMATCH lines above; reproduce with PL_SEED=$seed); $name_defects lost file names (DEFECT lines)"
echo OK
