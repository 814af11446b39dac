#!/usr/bin/env bash
# xnbd-server's command line: --help and --version exit 0; a missing file,
# a directory, a bad option, a missing option argument, a bad address and a
# port in use each exit 1 with a message naming the problem; --port-file
# and --pidfile are written; SIGTERM and SIGINT shut down with status 0,
# also with clients connected, and written data is in the file; --daemon
# detaches and its pidfile names the running server.
source "$(dirname "$0")/functions.sh"
requires qemu-io nbdinfo timeout

srv=$XNBD_BUILD/xnbd-server
[ -x "$srv" ] || fail "$srv not built"
img=$TESTDIR/disk.img
make_image "$img" 16M

# expect_exit STATUS PATTERN ARGS...: runs the server (bounded by timeout,
# so a server that wrongly starts serving fails the test) and checks the
# exit status and that stderr matches PATTERN (extended regexp, no case).
expect_exit () {
  local want=$1 pat=$2 st=0; shift 2
  timeout 10 "$srv" "$@" >"$TESTDIR/out" 2>"$TESTDIR/err" </dev/null || st=$?
  [ "$st" -eq "$want" ] ||
    fail "xnbd-server $* exited $st, expected $want; stderr: $(cat "$TESTDIR/err")"
  if [ -n "$pat" ] && ! grep -qiE -- "$pat" "$TESTDIR/err"; then
    fail "xnbd-server $*: stderr does not match /$pat/: $(cat "$TESTDIR/err")"
  fi
}

# ---- help and version
expect_exit 0 '' --help
grep -q -- '--listen' "$TESTDIR/out" && grep -q -- '--unix' "$TESTDIR/out" ||
  fail "--help does not describe --listen and --unix: $(cat "$TESTDIR/out")"
expect_exit 0 '' -h
expect_exit 0 '' --version
grep -qE '[0-9]+\.[0-9]+' "$TESTDIR/out" || fail "--version prints no version: $(cat "$TESTDIR/out")"
expect_exit 0 '' -V

# ---- errors
sock=$TESTDIR/sock
expect_exit 1 "$TESTDIR/no-such-file.img" -u "$sock" -p "$TESTDIR/pid.none" "$TESTDIR/no-such-file.img"
expect_exit 1 'no-such-file' -u "$sock" -e foo="$TESTDIR/no-such-file.img" "$img"
expect_exit 1 "$TESTDIR" -u "$sock" "$TESTDIR"
expect_exit 1 'bogus-option' --bogus-option -u "$sock" "$img"
expect_exit 1 'listen|argument|requires' -u "$sock" "$img" --listen
expect_exit 1 'port|address|notaport' -l 127.0.0.1:notaport "$img"
expect_exit 1 'port|65536' -l 127.0.0.1:65536 "$img"
expect_exit 1 'threads|-t' -u "$sock" -t nonsense "$img"
expect_exit 1 'export|NAME=FILE|=' -u "$sock" -e justaname "$img"
[ ! -e "$TESTDIR/pid.none" ] || fail "a pidfile was written by a failed start"

# ---- port in use (and --port-file)
start_server xnbd-server -l 127.0.0.1:0 --port-file "$TESTDIR/port" "$img"
pid1=$SERVER_PID
port=$(cat "$TESTDIR/port")
[[ $port =~ ^[0-9]+$ ]] && [ "$port" -gt 0 ] && [ "$port" -lt 65536 ] ||
  fail "--port-file holds '$port'"
nbdinfo "nbd://127.0.0.1:$port" >/dev/null || fail "nothing serves on the port from --port-file"
expect_exit 1 "in use|$port" -l "127.0.0.1:$port" -u "$TESTDIR/sock2" "$img"
assert_alive "$pid1"

# ---- SIGTERM: written data is in the file, exit status 0
qio "nbd://127.0.0.1:$port" "write -P 0x5e 1M 1M" "write -P 0x6f 5 3"
st=0; stop_server "$pid1" TERM || st=$?
[ "$st" -eq 0 ] || fail "exit status $st after SIGTERM"
qio "$img" "read -P 0x5e 1M 1M" "read -P 0x6f 5 3"

# ---- SIGINT with one client in transmission (an interactive qemu-io that
# has written and waits for more commands) and one connection that never
# negotiates: still a prompt exit with status 0, the data in the file.
start_server xnbd-server -u "$sock" -l 127.0.0.1:0 --port-file "$TESTDIR/port2" "$img"
pid2=$SERVER_PID
port2=$(cat "$TESTDIR/port2")
mkfifo "$TESTDIR/fifo"
qemu-io -f raw "$(nbd_unix_uri "$sock")" <"$TESTDIR/fifo" >"$TESTDIR/qio.log" 2>&1 &
qio_pid=$!
exec 7>"$TESTDIR/fifo"          # keeps qemu-io waiting for commands
echo 'write -P 0x7a 2M 64k' >&7
wait_for grep -q 'wrote 65536' "$TESTDIR/qio.log" || fail "interactive qemu-io did not write"
exec 6<>"/dev/tcp/127.0.0.1/$port2"   # connected, silent
st=0; stop_server "$pid2" INT || st=$?
[ "$st" -eq 0 ] || fail "exit status $st after SIGINT with clients connected"
exec 6>&- 7>&-                  # qemu-io sees EOF on stdin and quits
qemu_io_gone () { ! server_alive "$qio_pid"; }
wait_for qemu_io_gone || fail "qemu-io did not exit"
wait "$qio_pid" || true
qio "$img" "read -P 0x7a 2M 64k"

# ---- --daemon: the parent exits 0 once ready; the pidfile names the daemon
dpid_file=$TESTDIR/daemon.pid
st=0; timeout 10 "$srv" -d --pidfile "$dpid_file" -u "$TESTDIR/dsock" "$img" || st=$?
[ "$st" -eq 0 ] || fail "xnbd-server -d exited $st"
[ -s "$dpid_file" ] || fail "daemon wrote no pidfile before the parent exited"
dpid=$(cat "$dpid_file")
is_our_daemon () {              # (the binary may have been rebuilt since)
  local exe
  pid_running "$1" || return 1
  exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
  [ "${exe% (deleted)}" = "$(readlink -f "$srv")" ]
}
kill_daemon () {                # TERM, then KILL, only while it is our daemon
  local i
  is_our_daemon "$1" || return 0
  kill -TERM "$1"
  for (( i = 0; i < 50; i++ )); do is_our_daemon "$1" || return 0; sleep 0.1; done
  echo "daemon $1 ignored SIGTERM, sending SIGKILL" >&2
  kill -KILL "$1"
}
cleanup_fn kill_daemon "$dpid"
pid_running "$dpid" || fail "daemon PID $dpid is not running"
is_our_daemon "$dpid" || fail "PID $dpid from the pidfile is not xnbd-server"
# The daemon must serve data, not just negotiate (bounded: a daemon that
# lost its I/O threads in fork() would hang here).
timeout 20 nbdinfo --list "$(nbd_unix_uri "$TESTDIR/dsock")" >/dev/null ||
  fail "daemon does not negotiate"
QIO_TIMEOUT=20 qio "$(nbd_unix_uri "$TESTDIR/dsock")" "write -P 0x4b 3M 1M" "read -P 0x4b 3M 1M" "flush"
kill -TERM "$dpid"
daemon_gone () { ! pid_running "$dpid"; }
wait_for daemon_gone || fail "daemon still running after SIGTERM"
qio "$img" "read -P 0x4b 3M 1M"
echo OK
