#!/usr/bin/env bash
# xnbd-proxy in front of `nbdkit file` (read-only): qemu-io, fio and nbdcopy
# at the destination while the background copy runs; the result must equal
# a model and the source must be unchanged.  See proxy-clients-common.sh.
source "$(dirname "$0")/functions.sh"
source "$(dirname "$0")/proxy-clients-common.sh"
requires nbdkit

start_source () {
  start_nbdkit -r -U "$2" file file="$1"
}

run_proxy_clients_test
