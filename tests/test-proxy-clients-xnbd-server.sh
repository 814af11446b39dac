#!/usr/bin/env bash
# xnbd-proxy in front of xnbd-server (read-only): qemu-io, fio and nbdcopy
# at the destination while the background copy runs; the result must equal
# a model and the source must be unchanged.  See proxy-clients-common.sh.
source "$(dirname "$0")/functions.sh"
source "$(dirname "$0")/proxy-clients-common.sh"

start_source () {
  start_server xnbd-server -r -u "$2" "$1"
}

run_proxy_clients_test
