#!/usr/bin/env bash
# The nbdkit front end of the migration engine (nbdkit-dedup-plugin):
#   - parameter errors and .get_ready refuse to start, with clear messages;
#     --help lists the parameters; the thread model is parallel;
#   - under --filter=stats: nbdinfo sees the engine's flags and block
#     sizes, block status (from the cache: the source's hole reads as
#     zero once copied), NBD_CMD_CACHE
#     fetches without data, a fast zero of a partly missing block is refused
#     with ENOTSUP and an aligned one works, and xnbd-ctl (the real client)
#     drives the plugin's control socket: status, rate, pause, resume,
#     cache-all --wait, flush, reconnect, detach;
#   - after the detach the source is gone; nbdkit -r serves the complete
#     cache without a target, read-only, equal to the model;
#   - `nbdkit PLUGIN ... --run 'nbdcopy "$uri" FILE'` copies the disk.
# The engine's own behaviour through this front end is covered by the
# engine tests run as NAME@nbdkit (run-tests.sh).
source "$(dirname "$0")/functions.sh"
requires nbdkit nbdinfo nbdcopy qemu-io qemu-img python3 readelf
[ -f "$PLUGIN_SO" ] || fail "$PLUGIN_SO not built (run make)"

M=$((1024 * 1024))
src=$TESTDIR/src.img model=$TESTDIR/model.img
ssock=$TESTDIR/src.sock psock=$TESTDIR/plugin.sock ctlsock=$TESTDIR/ctl
cache=$TESTDIR/cache.img bitmap=$TESTDIR/cache.bitmap
CTLBIN=$XNBD_BUILD/xnbd-ctl
# Chunk types (make_image, seed 5): 0 written zeros, 1 text, 2 hole, 3 random.
make_image "$src" 32M 5
cp --sparse=always "$src" "$model"
src_sha=$(sha "$src")
start_server xnbd-server -r -u "$ssock" "$src"
src_pid=$SERVER_PID
suri=$(nbd_unix_uri "$ssock")
uri=$(nbd_unix_uri "$psock")

# nbdkit PLUGIN ARGS... that must refuse to start with a message matching RE.
refuses () {   # RE ARGS...
  local re=$1 out st=0; shift
  # -f: a start that should have been refused stays in the foreground, where
  # the timeout ends it, instead of forking away and outliving the test.
  out=$(env $(nbdkit_env) timeout 30 nbdkit -f -U "$TESTDIR/never.sock" "$PLUGIN_SO" "$@" 2>&1 </dev/null) || st=$?
  [ "$st" -ne 0 ] || fail "nbdkit dedup $* started (expected a refusal)"
  grep -qE "$re" <<<"$out" || fail "nbdkit dedup $*: message '$out' does not match /$re/"
  echo "refused as expected: $out"
}

# ------------------------------------------------------------ configuration
help=$(env $(nbdkit_env) nbdkit "$PLUGIN_SO" --help)
for k in target= cache= bitmap= control= cache-all= bg-rate= block-size= source-timeout= \
         tls-psk= detach-when-complete= max-fetch= connections=; do
  grep -q -- "^$k" <<<"$help" || fail "nbdkit dedup --help does not list $k"
done
dump=$(env $(nbdkit_env) nbdkit --dump-plugin "$PLUGIN_SO")
grep -qx 'thread_model=parallel' <<<"$dump" || fail "thread model is not parallel: $dump"
grep -qx 'has_after_fork=1' <<<"$dump" || fail "no .after_fork: $dump"

common=(cache="$cache" bitmap="$bitmap" control="$ctlsock")
refuses 'control=SOCK is required' target="$suri" cache="$cache" bitmap="$bitmap"
refuses 'cache=FILE and bitmap=FILE are required' target="$suri" control="$ctlsock"
refuses "block-size 3000: " target="$suri" "${common[@]}" block-size=3000
refuses "bg-rate 'fast': " target="$suri" "${common[@]}" bg-rate=fast
refuses "connections: '0' is not a number from 1 to 16" target="$suri" "${common[@]}" connections=0
refuses 'cache-all=maybe: expected true or false' target="$suri" "${common[@]}" cache-all=maybe
refuses 'target-export= goes with a HOST:PORT target only' target="$suri" target-export=x "${common[@]}"
refuses "seed=$TESTDIR/no-such-seed: No such file" target="$suri" "${common[@]}" seed="$TESTDIR/no-such-seed"
refuses "unknown parameter 'cachefile'" target="$suri" "${common[@]}" cachefile=x
refuses "cache=$TESTDIR/no/such/dir/c.img: directory $TESTDIR/no/such/dir: No such file" \
  target="$suri" cache="$TESTDIR/no/such/dir/c.img" bitmap="$bitmap" control="$ctlsock"
[ ! -e "$cache" ] && [ ! -e "$bitmap" ] || fail "a refused start created the cache or bitmap"

# check_map STRICT: nbdinfo --map of the plugin covers the export; with
# STRICT, chunk 2 (a hole at the source) reads as zero and chunk 3 (random)
# as data.
check_map () {
  local map
  map=$(nbdinfo --map --json "$uri")
  python3 - "$map" "$M" "$1" <<'EOF' || fail "block status: $map"
import json, sys
ext, M, strict = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
def at(off):
    for e in ext:
        if e["offset"] <= off < e["offset"] + e["length"]:
            return e["type"]
    sys.exit("no extent covers %d" % off)
end = max(e["offset"] + e["length"] for e in ext)
assert end == 32 * M, "extents end at %d" % end
if strict:
    assert at(2 * M) & 2 and at(3 * M - 1) & 2, "chunk 2 (hole) is not zero"
    assert at(3 * M) & 2 == 0, "chunk 3 (random data) reads as zero"
EOF
}

# ------------------------------------------------------------ serving, under a filter
stats=$TESTDIR/stats.txt
start_plugin "$ctlsock" -U "$psock" --filter=stats "$PLUGIN_SO" target="$suri" \
  "${common[@]}" statsfile="$stats" statsappend=false
plugin_pid=$SERVER_PID
wait_state "$ctlsock" proxying 30

info=$(nbdinfo --json "$uri")
py_check () {   # JSON PYEXPR WHAT
  python3 -c 'import json,sys; j=json.loads(sys.argv[1])["exports"][0]; sys.exit(0 if eval(sys.argv[2]) else 1)' "$1" "$2" ||
    fail "$3: $1"
}
py_check "$info" "j['export-size'] == 32 * 1024 * 1024" "export size"
for f in can_multi_conn can_fua can_cache can_fast_zero can_trim can_zero can_flush; do
  py_check "$info" "j['$f'] is True" "$f is not true"
done
py_check "$info" "j['is_read_only'] is False" "read-only without -r"
py_check "$info" "j['block_size_preferred'] == 4096 and j['block_size_maximum'] == 32 * 1024 * 1024" \
  "block sizes"

# Block status through the plugin covers the export (missing blocks read
# as data until they are here; checked again from the cache below).
check_map 0

# NBD_CMD_CACHE fetches 1 MiB of random data (chunk 7) without returning it.
present0=$(proxy_status "$ctlsock" blocks.present)
NBDOP=$XNBD_BUILD/tests/nbd-op
"$NBDOP" "$uri" cache $((7 * M)) $((1 * M)) >/dev/null
present1=$(proxy_status "$ctlsock" blocks.present)
[ "$present1" -ge $((present0 + 256)) ] ||
  fail "NBD_CMD_CACHE made $((present1 - present0)) blocks present, expected 256"

# Fast zero: refused (ENOTSUP) when a partial block is missing; whole
# blocks are zeroed at once.
st=0; out=$("$NBDOP" "$uri" fast-zero $((11 * M + 100)) 1000) || st=$?
[ "$st" -eq 1 ] && [[ $out == "error ENOTSUP:"* || $out == "error EOPNOTSUPP:"* ]] ||
  fail "fast zero of a partly missing block: '$out' (exit $st; expected ENOTSUP)"
"$NBDOP" "$uri" fast-zero $((15 * M)) $((64 * 1024)) >/dev/null
qio "$model" "write -z $((15 * M)) 64k"
qio "$uri" "read -P 0 $((15 * M)) 64k" "write -f -P 0x3c $((19 * M + 7)) 5000"
qio "$model" "write -P 0x3c $((19 * M + 7)) 5000"

# The control socket with the real client.
"$CTLBIN" --control "$ctlsock" status | grep -q '^state: *proxying' ||
  fail "xnbd-ctl status does not show the proxying state"
"$CTLBIN" --control "$ctlsock" rate 2M
[ "$(proxy_status "$ctlsock" background.rate)" -eq $((2 * M)) ] || fail "rate 2M was not applied"
"$CTLBIN" --control "$ctlsock" cache-all
"$CTLBIN" --control "$ctlsock" pause
[ "$(proxy_status "$ctlsock" background.paused)" = true ] || fail "pause was not applied"
"$CTLBIN" --control "$ctlsock" resume
"$CTLBIN" --control "$ctlsock" rate 0
timeout 120 "$CTLBIN" --control "$ctlsock" cache-all --wait
"$CTLBIN" --control "$ctlsock" flush
"$CTLBIN" --control "$ctlsock" reconnect "$suri"
wait_state "$ctlsock" complete 30
"$CTLBIN" --control "$ctlsock" detach
[ "$(proxy_status "$ctlsock" state)" = detached ] || fail "not detached after detach"
stop_ok "$src_pid" xnbd-server
# Served from the cache alone now.
check_map 1
nbdcopy "$uri" "$TESTDIR/copy.img"
same_content "$TESTDIR/copy.img" "$model"
stop_ok "$plugin_pid" "nbdkit dedup"
grep -qE '^read: ' "$stats" && grep -qE '^zero: ' "$stats" && grep -qE '^cache: ' "$stats" ||
  fail "the stats filter saw no read, zero or cache requests: $(cat "$stats")"
same_content "$cache" "$model"
[ "$(sha "$src")" = "$src_sha" ] || fail "the source image changed"

# ------------------------------------------------------------ read-only, no target
start_plugin "$ctlsock" -r -U "$psock" "$PLUGIN_SO" "${common[@]}"
ro_pid=$SERVER_PID
py_check "$(nbdinfo --json "$uri")" "j['is_read_only'] is True" "nbdkit -r is not read-only"
st=0; out=$(timeout 30 qemu-io -f raw -c "write -P 1 0 4096" "$uri" 2>&1) || st=$?
grep -qiE 'read-only|not permitted|denied' <<<"$out" ||
  fail "a write through nbdkit -r was not refused: $out (exit $st)"
qemu-img compare -f raw -F raw "$model" "$uri" || fail "read-only plugin differs from the model"
stop_ok "$ro_pid" "nbdkit dedup -r"

# ------------------------------------------------------------ --run
start_server xnbd-server -r -u "$ssock" "$src"
env $(nbdkit_env) timeout 120 nbdkit -U - "$PLUGIN_SO" target="$suri" \
  cache="$TESTDIR/run.img" bitmap="$TESTDIR/run.bitmap" control="$TESTDIR/run.ctl" \
  --run "env -u LD_PRELOAD nbdcopy \"\$uri\" $TESTDIR/run-copy.img" </dev/null ||
  fail "nbdkit dedup --run nbdcopy failed"
same_content "$TESTDIR/run-copy.img" "$src"
echo OK
