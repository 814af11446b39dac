#!/usr/bin/env bash
# xnbd-proxy in front of qemu-nbd (raw, read-only, persistent): qemu-io, fio
# and nbdcopy at the destination while the background copy runs; the result
# must equal a model and the source must be unchanged.  See
# proxy-clients-common.sh.
source "$(dirname "$0")/functions.sh"
source "$(dirname "$0")/proxy-clients-common.sh"
requires qemu-nbd

start_source () {
  start_qemu_nbd -f raw --persistent -r -k "$2" "$1"
}

run_proxy_clients_test
