#!/usr/bin/env bash
# Store benchmarks for a broker binary on this machine: start-up time and RSS
# with a backlog, disk bytes per message, draining a backlog, purge stalls.
# Usage: examples/bench/store.sh [MESSAGES]   (default 1000000; release build first:
#   cargo build --release --example perf --bin hare)
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-1000000}
PORT=5690
DATA=${BENCH_DATA:-/tmp/hare-bench-data}
URL="amqp://guest:guest@127.0.0.1:$PORT/%2f"
PERF=target/release/examples/perf
HARE=target/release/hare

start() {
  local t0; t0=$(date +%s.%N)
  "$HARE" --listen 127.0.0.1:$PORT --data-dir "$DATA" --no-metrics 2>>/tmp/hare-bench.log &
  PID=$!
  until (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; do sleep 0.01; done
  echo "start-up: $(echo "$(date +%s.%N) - $t0" | bc) s, RSS $(( $(awk '{print $2}' /proc/$PID/statm) * 4 )) KiB"
}

rm -rf "$DATA"; start
$PERF --url "$URL" --queue backlog --durable --persistent --confirm --size 1024 \
  --producers 1 --consumers 0 --count "$N" --keep-queue --outstanding 1000
echo "data dir with $N x 1 KiB: $(du -sb "$DATA" | cut -f1) bytes; RSS $(( $(awk '{print $2}' /proc/$PID/statm) * 4 )) KiB"
kill -9 $PID; wait $PID 2>/dev/null || true
start
$PERF --url "$URL" --queue backlog --durable --producers 0 --consumers 1 --prefetch 1000 \
  --count "$N" --keep-queue
$PERF --url "$URL" --queue backlog --durable --persistent --confirm --size 1024 \
  --producers 1 --consumers 0 --count "$N" --keep-queue --outstanding 1000
python3 examples/bench/purge_stall.py "$URL" backlog purge
kill $PID; wait $PID 2>/dev/null || true
