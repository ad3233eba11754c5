#!/usr/bin/env bash
# Runs N ranks of `flashpack run` on this machine, for trying a pipeline without a second one
# (docs/decisions/0034-pipeline-ranks.md):
#
#   scripts/launch-local.sh 2 model.flashpack --prompt "The history of" --max-tokens 64
#
# Writes a loopback hostfile in mlx's JSON form (ports from FLASHPACK_BASE_PORT, 32323 by
# default, one per rank, the next one for the heartbeat), starts ranks 1..N-1 in the
# background (their stats lines on stderr) and rank 0 in the foreground (the answer on stdout).
# The exit status is the first failing rank's, else 0. FLASHPACK sets the binary
# (target/release/flashpack by default).
set -euo pipefail
n=${1:?usage: launch-local.sh N PACK [run options...]}
shift
bin=${FLASHPACK:-target/release/flashpack}
base=${FLASHPACK_BASE_PORT:-32323}
hostfile=$(mktemp -t flashpack-hosts.XXXXXX.json)
trap 'rm -f "$hostfile"' EXIT
{
  printf '['
  for ((r = 0; r < n; r++)); do
    ((r > 0)) && printf ', '
    printf '["127.0.0.1:%d"]' $((base + r))
  done
  printf ']\n'
} >"$hostfile"
pids=()
for ((r = 1; r < n; r++)); do
  "$bin" run "$@" --hostfile "$hostfile" --rank "$r" &
  pids+=($!)
done
status=0
"$bin" run "$@" --hostfile "$hostfile" --rank 0 || status=$?
for p in "${pids[@]}"; do
  wait "$p" || { s=$?; ((status == 0)) && status=$s; }
done
exit "$status"
