# shellcheck shell=bash
# functions.sh: helpers shared by every end-to-end test.  Source it first:
#
#   #!/usr/bin/env bash
#   source "$(dirname "$0")/functions.sh"
#   requires qemu-io
#   start_server xnbd-server -u "$TESTDIR/sock" "$TESTDIR/disk.img"
#   ...
#
# What it gives a test:
#   $XNBD_BUILD   absolute build directory (binaries: $XNBD_BUILD/xnbd-server,
#                 helper programs: $XNBD_BUILD/tests/NAME).  Exported by
#                 tests/run-tests.sh; defaults to <source>/build when a test is
#                 run by hand.
#   $XNBD_SRC     absolute source directory.
#   $TESTDIR      a private temporary directory, removed on exit.
#   requires CMD...        fail (not skip) when a command is missing: every
#                          tool a test uses is installed by `make check`.
#   requires_path PATH...  skip (exit 77) when a device or path that a
#                          machine may simply not have is absent.
#   skip MSG               skip the test (exit 77).
#   fail MSG               print "FAIL: MSG" and exit 1.
#   cleanup_fn CMD...      run CMD from the EXIT trap (last registered first).
#   start_server NAME ARGS...
#                          start a server in the background with --pidfile in
#                          $TESTDIR and wait until the pidfile exists (that is
#                          when every listener is ready).  Sets SERVER_PID,
#                          SERVER_LOG (its stderr) and SERVER_PIDFILE.  The
#                          process is killed, by that PID only, on exit.
#                          Do not call it in a subshell ($(...), pipes).
#                          NAME may be a path (another program); set
#                          START_PIDFILE_OPT if its option is not --pidfile.
#   start_nbdkit ARGS... / start_qemu_nbd ARGS... / start_proxy ARGS...
#                          start_server for `nbdkit -f`, qemu-nbd and
#                          xnbd-proxy (start_proxy sets PROXY_PID, PROXY_LOG).
#                          start_proxy takes xnbd-proxy's options whatever
#                          the front end: with XNBD_FRONTEND=nbdkit it runs
#                          the migration engine as `nbdkit -f ... dedup
#                          key=value...` instead (the options translated to
#                          the plugin's parameters, returning once its
#                          control socket answers).  Engine tests run with
#                          both front ends (run-tests.sh, ENGINE_TESTS).
#   $XNBD_FRONTEND         proxy (default) or nbdkit.
#   start_plugin CTLSOCK NBDKIT-ARGS...
#                          `nbdkit -f -v NBDKIT-ARGS...` (the plugin and its
#                          parameters among them), ready once CTLSOCK answers.
#   $PLUGIN_SO             the built plugin; nbdkit_env prints the env
#                          assignments nbdkit needs to load it (the ASan
#                          runtime when the plugin is sanitizer-built).
#   ctl SOCK LINE          send one line to a proxy control socket, print
#                          the one-line JSON reply.
#   ctl_ok SOCK LINE       ctl, and fail unless the reply is {"ok":true...}.
#   ctl_err SOCK LINE      ctl, and fail unless the reply is {"ok":false,
#                          "error":"..."}; the error text is in CTL_ERROR.
#   json_get JSON KEY[.KEY...]   one member of a JSON object.
#   proxy_status SOCK KEY[.KEY...]   one member of the proxy's status.
#   wait_status SOCK SECONDS PYEXPR
#                          poll status (0.1 s apart, at most SECONDS) until
#                          the Python expression PYEXPR on the status dict `j`
#                          is true; on timeout print the last status, fail.
#   wait_state SOCK STATE [SECONDS]   wait_status for j["state"] == STATE.
#   stop_server PID [SIG]  signal the server (TERM by default), wait (bounded)
#                          for it and return its exit status.
#   server_alive PID       whether a server we started is still running.
#   assert_alive PID       fail unless it is.
#   pid_running PID        whether any process PID runs (not a zombie).
#   qio TARGET CMD...      qemu-io -f raw -c CMD... on an NBD URI or a file,
#                          failing on any error (bounded by QIO_TIMEOUT s).
#   same_content A B       cmp, failing with the first difference.
#   wait_for CMD...        retry CMD until it succeeds, at most WAIT_TRIES
#                          times (default 100) 0.1 s apart.
#   make_image FILE SIZE [SEED]
#                          deterministic image: 1 MiB chunks of random data,
#                          written zeros, text and holes.
#   make_sparse_image FILE SIZE
#                          all-hole image (truncate).
#   sha FILE               sha256 of a file.
#   nbd_unix_uri SOCKET [EXPORT]   nbd+unix:///EXPORT?socket=SOCKET

set -e -u -o pipefail
set -E

XNBD_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${XNBD_BUILD:=$XNBD_SRC/build}"
XNBD_BUILD=$(cd "$XNBD_BUILD" 2>/dev/null && pwd) ||
  { echo "FAIL: build directory $XNBD_BUILD does not exist (run make)" >&2; exit 1; }
export XNBD_SRC XNBD_BUILD

TEST_NAME=$(basename "$0" .sh)
TESTDIR=$(mktemp -d "${TMPDIR:-/tmp}/$TEST_NAME.XXXXXX")
export TESTDIR

# ---------------------------------------------------------------- cleanup

_cleanup_cmds=()
_server_pids=()

cleanup_fn ()
{
  _cleanup_cmds+=("$(printf '%q ' "$@")")
}

_run_cleanup ()
{
  local status=$? i pid
  set +e
  trap - ERR
  for (( i = ${#_cleanup_cmds[@]} - 1; i >= 0; i-- )); do
    eval "${_cleanup_cmds[i]}"
  done
  for pid in "${_server_pids[@]}"; do
    if server_alive "$pid"; then
      _stop_pid "$pid" TERM >/dev/null 2>&1
    fi
  done
  if [ "$status" -ne 0 ] && [ "$status" -ne 77 ]; then
    _dump_server_logs
  fi
  rm -rf "$TESTDIR"
  exit "$status"
}
trap _run_cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'echo "FAIL: command failed (status $?) at ${BASH_SOURCE[0]##*/}:$LINENO: $BASH_COMMAND" >&2' ERR

_dump_server_logs ()
{
  local f
  for f in "$TESTDIR"/*.server.log; do
    [ -s "$f" ] || continue
    if grep -qE 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer' "$f"; then
      echo "---- ${f##*/} (sanitizer report) ----" >&2
      grep -m1 -B2 -A60 -E 'ERROR: AddressSanitizer|runtime error:|ERROR: LeakSanitizer' "$f" >&2
    else
      echo "---- ${f##*/} (last 50 lines) ----" >&2
      tail -n 50 "$f" >&2
    fi
  done
}

# ---------------------------------------------------------------- outcome

fail ()
{
  echo "FAIL: $*" >&2
  exit 1
}

skip ()
{
  echo "SKIP: $*" >&2
  exit 77
}

requires ()
{
  local c
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 ||
      fail "required command '$c' is not installed (make check installs it; run 'make deps')"
  done
}

requires_path ()
{
  local p
  for p in "$@"; do
    [ -e "$p" ] || skip "$p does not exist on this machine"
  done
}

# ---------------------------------------------------------------- waiting

: "${WAIT_TRIES:=100}"

wait_for ()
{
  local i
  for (( i = 0; i < WAIT_TRIES; i++ )); do
    if "$@"; then return 0; fi
    sleep 0.1
  done
  echo "wait_for: '$*' still false after $WAIT_TRIES tries" >&2
  return 1
}

# ---------------------------------------------------------------- servers

_server_count=0

start_server ()
{
  local name=$1; shift
  local prog=$name
  case "$prog" in
    */*) ;;
    *) prog=$XNBD_BUILD/$name ;;
  esac
  [ -x "$prog" ] || fail "$prog not built (run make)"
  _server_count=$((_server_count + 1))
  local base
  base=$TESTDIR/${name##*/}.$_server_count
  SERVER_PIDFILE=$base.pid
  SERVER_LOG=$base.server.log
  rm -f "$SERVER_PIDFILE"
  env ${START_ENV:-} "$prog" "${START_PIDFILE_OPT:---pidfile}" "$SERVER_PIDFILE" "$@" </dev/null >"$SERVER_LOG" 2>&1 &
  SERVER_PID=$!
  _server_pids+=("$SERVER_PID")
  local i
  for (( i = 0; i < WAIT_TRIES; i++ )); do
    [ -s "$SERVER_PIDFILE" ] && break
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      cat "$SERVER_LOG" >&2
      fail "$name $* exited before it was ready"
    fi
    sleep 0.1
  done
  [ -s "$SERVER_PIDFILE" ] ||
    fail "$name $* wrote no pidfile after $WAIT_TRIES tries"
  local filepid
  filepid=$(cat "$SERVER_PIDFILE")
  [ "$filepid" = "$SERVER_PID" ] ||
    fail "pidfile $SERVER_PIDFILE holds '$filepid', expected $SERVER_PID"
}

# Whether PID is a running (not zombie) process.
pid_running ()
{
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

# Whether a server we started (a child of this shell) is still running.
# bash reaps children on its own, so a PID that exited may already belong
# to another process: the parent check keeps us from signalling it.
server_alive ()
{
  local ppid
  pid_running "$1" || return 1
  ppid=$(awk '{print $4}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ "$ppid" = "$$" ]
}

# Signals PID and waits at most 10 s for it, then SIGKILLs it.  Returns the
# exit status as the shell reports it (128+N when killed by signal N).
_stop_pid ()
{
  local pid=$1 sig=${2:-TERM} i st=0
  kill -"$sig" "$pid" 2>/dev/null || true
  for (( i = 0; i < WAIT_TRIES; i++ )); do
    server_alive "$pid" || break
    sleep 0.1
  done
  if server_alive "$pid"; then
    echo "process $pid still running after SIG$sig, sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || st=$?
  return "$st"
}

stop_server ()
{
  local pid=$1 sig=${2:-TERM} st=0 p keep=()
  _stop_pid "$pid" "$sig" || st=$?
  # Reaped: forget it, so cleanup never signals a reused PID.
  for p in "${_server_pids[@]}"; do
    [ "$p" = "$pid" ] || keep+=("$p")
  done
  _server_pids=("${keep[@]}")
  return "$st"
}

# stop_ok PID NAME: stops a server with SIGTERM; it must exit with status 0.
stop_ok ()
{
  local st=0
  stop_server "$1" || st=$?
  [ "$st" -eq 0 ] || fail "$2 exited with status $st on SIGTERM"
}

# ---------------------------------------------------------------- images

# Size in bytes from "64M", "16MiB", "4096".
to_bytes ()
{
  numfmt --from=iec "${1%iB}"
}

_random_stream ()
{
  local seed=$1 key
  if command -v openssl >/dev/null 2>&1; then
    key=$(printf '%s' "xnbd-$seed" | sha256sum | cut -c1-32)
    openssl enc -aes-128-ctr -nosalt -K "$key" -iv 00000000000000000000000000000000 \
      </dev/zero 2>/dev/null
  else
    echo "note: openssl missing, image data is not deterministic" >&2
    cat /dev/urandom
  fi
}

make_image ()
{
  local file=$1 size seed=${3:-1} chunk=1048576 n i
  size=$(to_bytes "$2")
  _random_stream "$seed" | head -c "$size" >"$file" || true
  [ "$(stat -c %s "$file")" -eq "$size" ] || fail "make_image: short image $file"
  n=$(( (size + chunk - 1) / chunk ))
  local text=$TESTDIR/.text-chunk
  [ -s "$text" ] ||
    yes "xnbd test image line: the quick brown fox jumps over the lazy dog" |
      head -c "$chunk" >"$text" || true
  for (( i = 0; i < n; i++ )); do
    case $(( (i + seed) % 4 )) in
      0) ;;  # random
      1) dd if=/dev/zero of="$file" bs="$chunk" seek="$i" count=1 conv=notrunc status=none ;;
      2) dd if="$text" of="$file" bs="$chunk" seek="$i" count=1 conv=notrunc status=none ;;
      3) fallocate --punch-hole --offset $(( i * chunk )) --length "$chunk" "$file" 2>/dev/null ||
           dd if=/dev/zero of="$file" bs="$chunk" seek="$i" count=1 conv=notrunc status=none ;;
    esac
  done
  truncate -s "$size" "$file"
}

make_sparse_image ()
{
  rm -f "$1"
  truncate -s "$(to_bytes "$2")" "$1"
}

# make_text_image FILE MARKER BLOCKS: BLOCKS 4 KiB blocks alternating one
# byte repeated and lines of text carrying MARKER (what an eavesdropper on
# the link could grep for; text compresses, so compression shows too).
make_text_image ()
{
  python3 - "$1" "$2" "$3" <<'PY'
import sys
line = sys.argv[2].encode() + b" 0123456789 the quick brown fox\n"
with open(sys.argv[1], "wb") as f:
    for i in range(int(sys.argv[3])):
        f.write((line * 90)[:4096] if i % 2 else bytes([i % 251 + 1]) * 4096)
PY
}

# start_tap TARGET_PORT|SOCKET CAPTURE: a relay (tests/tools/tap-relay.py)
# to TARGET that appends every byte it forwards, both ways, to CAPTURE;
# sets TAP_PORT and TAP_PID.  stop_tap ends it.
start_tap ()
{
  local host=127.0.0.1 port=$1
  [[ $1 == /* ]] && host=$1 port=0
  rm -f "$TESTDIR/tap.port"
  python3 "$XNBD_SRC/tests/tools/tap-relay.py" "$TESTDIR/tap.port" "$host" "$port" "$2" &
  TAP_PID=$!
  cleanup_fn stop_tap "$TAP_PID"
  wait_for test -s "$TESTDIR/tap.port" || fail "the recording relay did not start"
  TAP_PORT=$(cat "$TESTDIR/tap.port")
}

stop_tap ()
{
  local pid=${1:-$TAP_PID}
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  [ "$pid" != "${TAP_PID:-}" ] || TAP_PID=
}

sha ()
{
  sha256sum "$1" | cut -d' ' -f1
}

nbd_unix_uri ()
{
  printf 'nbd+unix:///%s?socket=%s' "${2:-}" "$1"
}

# Fails unless a server we started is still running.
assert_alive ()
{
  server_alive "$1" || fail "server (PID $1) is no longer running"
}

# qio TARGET CMD...: runs qemu-io on TARGET (an NBD URI or a raw file) with
# each CMD as a -c command, fails if qemu-io fails or reports a failure.
# Output is in $QIO_OUT.
qio ()
{
  local target=$1; shift
  local args=() c st=0
  for c in "$@"; do args+=(-c "$c"); done
  QIO_OUT=$(timeout "${QIO_TIMEOUT:-120}" qemu-io -f raw "${args[@]}" "$target" 2>&1) || st=$?
  if [ "$st" -ne 0 ] || grep -qiE 'fail|error|not permitted|denied' <<<"$QIO_OUT"; then
    echo "$QIO_OUT" >&2
    fail "qemu-io $target ${*} (exit $st)"
  fi
}

# Compares two files; on a difference names the first differing byte.
same_content ()
{
  local out
  out=$(cmp "$1" "$2" 2>&1) || fail "$1 and $2 differ: $out"
}

# ---------------------------------------------------------------- proxy

start_nbdkit ()
{
  local prog
  prog=$(command -v nbdkit) || fail "nbdkit is not installed"
  start_server "$prog" -f "$@"
}

start_qemu_nbd ()
{
  local prog
  prog=$(command -v qemu-nbd) || fail "qemu-nbd is not installed"
  START_PIDFILE_OPT=--pid-file start_server "$prog" "$@"
}

: "${XNBD_FRONTEND:=proxy}"
PLUGIN_SO=$XNBD_BUILD/plugins/nbdkit-dedup-plugin.so

# The environment nbdkit needs for our plugin.  A sanitizer-built plugin
# (build-asan) needs the ASan runtime loaded into nbdkit, which is not
# instrumented itself: LD_PRELOAD.  Two adjustments make that work:
#   - nbdkit's libp11-kit (through GnuTLS) allocates in its constructor
#     while it holds glibc's locale lock; were ASan first initialized there,
#     lazily, the lock would be left damaged and nbdkit would hang at exit
#     (freelocale).  Preloaded ahead of libasan, p11-kit's constructor runs
#     after ASan's (verify_asan_link_order=0 allows that order).
#   - No leak check in nbdkit: nbdkit leaks a little itself, and it unloads
#     the plugin before the check, so plugin frames could not be named.  The
#     engine's leaks are checked through xnbd-proxy in the same pass; memory
#     errors and undefined behaviour in the plugin still abort nbdkit.
nbdkit_env ()
{
  readelf -d "$PLUGIN_SO" 2>/dev/null | grep -q 'libasan' || return 0
  local pre p11
  pre=$(${CC:-cc} -print-file-name=libasan.so)
  p11=$(ldd "$(command -v nbdkit)" | awk '/libp11-kit/ { print $3 }')
  [ -z "$p11" ] || pre=$p11:$pre
  printf 'LD_PRELOAD=%s ASAN_OPTIONS=verify_asan_link_order=0:detect_leaks=0%s ' \
    "$pre" "${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
}

start_proxy ()
{
  case "$XNBD_FRONTEND" in
    proxy) start_server xnbd-proxy "$@" ;;
    nbdkit) _start_plugin "$@" ;;
    *) fail "XNBD_FRONTEND='$XNBD_FRONTEND': expected proxy or nbdkit" ;;
  esac
  PROXY_PID=$SERVER_PID
  PROXY_LOG=$SERVER_LOG
}

# xnbd-proxy's options -> nbdkit's options and the plugin's parameters.
_start_plugin ()
{
  local opts=() params=() ctlsock="" nunix=0 prog o v
  prog=$(command -v nbdkit) || fail "nbdkit is not installed"
  [ -f "$PLUGIN_SO" ] || fail "$PLUGIN_SO not built (run make)"
  while [ $# -gt 0 ]; do
    o=$1; shift
    case "$o" in
      --*=*) v=${o#*=}; o=${o%%=*}; set -- "$v" "$@" ;;
    esac
    case "$o" in
      -t|--target) params+=("target=$1"); shift ;;
      -c|--cache) params+=("cache=$1"); shift ;;
      -b|--bitmap) params+=("bitmap=$1"); shift ;;
      -C|--control) params+=("control=$1"); ctlsock=$1; shift ;;
      --target-export|--compress|--tls-psk|--tls-certificates|--tls-username|\
      --source-id|--connections|--source-timeout|--block-size|--persist-interval|\
      --bg-rate|--bg-window|--max-fetch|--threads|--seed|--index|--digests)
        params+=("${o#--}=$1"); shift ;;
      --clear-bitmap|--cache-all|--detach-when-complete|--standby)
        params+=("${o#--}=true") ;;
      --no-tls-verify) params+=("tls-verify=false") ;;
      -u|--unix)
        nunix=$((nunix + 1))
        [ "$nunix" -eq 1 ] || fail "start_proxy: nbdkit listens on one unix socket only"
        opts+=(-U "$1"); shift ;;
      -e|--export) opts+=(-e "$1"); shift ;;
      -r|--readonly) opts+=(-r) ;;
      -v|--verbose) opts+=(-D dedup.verbose=1) ;;
      *) fail "start_proxy: xnbd-proxy option '$o' has no nbdkit translation here" ;;
    esac
  done
  [ "$nunix" -eq 1 ] || fail "start_proxy: the nbdkit front end needs -u SOCKET"
  [ -n "$ctlsock" ] || fail "start_proxy: the nbdkit front end needs --control SOCK"
  start_plugin "$ctlsock" "${opts[@]}" "$PLUGIN_SO" "${params[@]}"
}

# start_plugin CTLSOCK NBDKIT-ARGS...: start_server for `nbdkit -f -v
# NBDKIT-ARGS...` (which name the plugin and its parameters) in the
# environment the plugin needs; then, since nbdkit writes its pidfile before
# .after_fork starts the engine, waits until the control socket CTLSOCK
# answers (the engine may first wait for the source, up to its source
# timeout, as xnbd-proxy does).  The engine's info messages are nbdkit
# debug messages (-v); nbdkit's per-request ones are left out.
start_plugin ()
{
  local ctlsock=$1 prog i prev=""; shift
  prog=$(command -v nbdkit) || fail "nbdkit is not installed"
  # nbdkit leaves its -U socket file behind on exit, and will not bind
  # over it: a restart in the same test removes the stale one first.
  for i in "$@"; do
    if [ "$prev" = -U ] && [ -S "$i" ]; then rm -f "$i"; fi
    prev=$i
  done
  START_ENV=$(nbdkit_env) START_PIDFILE_OPT=-P \
    start_server "$prog" -f -v -D nbdkit.backend.datapath=0 -D nbdkit.backend.controlpath=0 "$@"
  for (( i = 0; i < 10 * ${START_PLUGIN_TIMEOUT:-90}; i++ )); do
    CTL_TIMEOUT=2 ctl "$ctlsock" status >/dev/null 2>&1 && return 0
    if ! server_alive "$SERVER_PID"; then
      cat "$SERVER_LOG" >&2
      fail "nbdkit dedup exited before its control socket answered"
    fi
    sleep 0.1
  done
  fail "nbdkit dedup: control socket $ctlsock never answered"
}

# The control-socket client: argv = SOCK TIMEOUT MODE [ARG...].
#   MODE cmd LINE        print the reply to LINE
#   MODE wait PYEXPR     poll status until PYEXPR holds for j
_CTL_PY='
import json, socket, sys, time
path, limit, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + limit

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(max(0.1, deadline - time.monotonic()))
    s.connect(path)
    return s, b""

def ask(conn, line):
    s, buf = conn
    s.sendall(line + b"\n")
    while b"\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError("control socket closed without a reply")
        buf += chunk
    reply, rest = buf.split(b"\n", 1)
    return (s, rest), reply.decode("utf-8", "replace")

if mode == "cmd":
    try:
        conn = connect()
        _, reply = ask(conn, sys.argv[4].encode())
    except (OSError, EOFError) as e:
        sys.exit("ctl %s: %s" % (path, e))
    print(reply)
    sys.exit(0)

expr = compile(sys.argv[4], "PYEXPR", "eval")
conn, last, err = None, None, None
while True:
    try:
        if conn is None:
            conn = connect()
        conn, reply = ask(conn, b"status")
        last = reply
        j = json.loads(reply)
        if j.get("ok") and eval(expr, {}, {"j": j}):
            sys.exit(0)
    except (OSError, EOFError, ValueError) as e:
        err, conn = e, None
    if time.monotonic() >= deadline:
        sys.stderr.write("wait_status: %r still false after %g s; last status: %s%s\n"
                         % (sys.argv[4], limit, last,
                            "; last error: %s" % err if err else ""))
        sys.exit(1)
    time.sleep(0.1)
'

: "${CTL_TIMEOUT:=10}"

ctl ()
{
  python3 -c "$_CTL_PY" "$1" "$CTL_TIMEOUT" cmd "$2"
}

ctl_ok ()
{
  local r
  r=$(ctl "$1" "$2") || fail "control command '$2' got no reply"
  [ "$(json_get "$r" ok)" = true ] || fail "control command '$2' failed: $r"
  printf '%s\n' "$r"
}

ctl_err ()
{
  local r
  r=$(ctl "$1" "$2") || fail "control command '$2' got no reply"
  [ "$(json_get "$r" ok)" = false ] || fail "control command '$2' succeeded, expected an error: $r"
  CTL_ERROR=$(json_get "$r" error) || fail "control command '$2': error reply without an error member: $r"
  [ -n "$CTL_ERROR" ] || fail "control command '$2': empty error message: $r"
}

json_get ()
{
  python3 -c '
import json, sys
v = json.loads(sys.argv[1])
for k in sys.argv[2].split("."):
    v = v[k]
print(json.dumps(v) if isinstance(v, (bool, type(None), dict, list)) else v)
' "$1" "$2"
}

proxy_status ()
{
  local j
  j=$(ctl "$1" status) || return 1
  json_get "$j" "$2"
}

wait_status ()
{
  python3 -c "$_CTL_PY" "$1" "$2" wait "$3" ||
    fail "proxy status never satisfied: $3"
}

wait_state ()
{
  wait_status "$1" "${3:-60}" "j[\"state\"] == \"$2\""
}
