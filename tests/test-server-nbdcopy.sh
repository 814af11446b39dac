#!/usr/bin/env bash
# nbdcopy through xnbd-server: file -> NBD (into an export prefilled with
# other data, so zero runs must really be written), NBD -> file, NBD -> NBD
# between two exports of one server, with several connections and requests
# in flight; every copy is checked with cmp.
source "$(dirname "$0")/functions.sh"
requires nbdcopy cmp

src=$TESTDIR/src.img
a=$TESTDIR/a.img
b=$TESTDIR/b.img
make_image "$src" 64M 5
make_image "$a" 64M 6
make_sparse_image "$b" 64M
printf 'junk' | dd of="$b" bs=1 seek=12345678 conv=notrunc status=none

sock=$TESTDIR/sock
start_server xnbd-server -u "$sock" -e b="$b" "$a"
pid=$SERVER_PID
uri_a=$(nbd_unix_uri "$sock")
uri_b=$(nbd_unix_uri "$sock" b)

# file -> nbd
nbdcopy --flush "$src" "$uri_a"
# nbd -> file
nbdcopy "$uri_a" "$TESTDIR/out1.img"
same_content "$src" "$TESTDIR/out1.img"
# nbd -> nbd, 4 connections, 16 requests in flight each, 1 MiB requests
nbdcopy --flush -C 4 -R 16 --request-size=1048576 "$uri_a" "$uri_b"
nbdcopy "$uri_b" "$TESTDIR/out2.img"
same_content "$src" "$TESTDIR/out2.img"
# small requests, single connection
nbdcopy -C 1 --request-size=4096 "$uri_b" "$TESTDIR/out3.img"
same_content "$src" "$TESTDIR/out3.img"

assert_alive "$pid"
stop_ok "$pid" xnbd-server
same_content "$src" "$a"
same_content "$src" "$b"
echo OK
