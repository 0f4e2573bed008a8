#!/usr/bin/env bash
# A private, throwaway three-node RabbitMQ cluster (Debian's rabbitmq-server)
# on loopback, for showing that work on quorum queues survives losing a node.
#
# usage: rabbitmq-cluster.sh start DIR BASEPORT [WATCH_PID]
#        rabbitmq-cluster.sh stop DIR
#        rabbitmq-cluster.sh kill DIR N          (N = 1, 2 or 3)
#        rabbitmq-cluster.sh restart DIR N
#        rabbitmq-cluster.sh restart-down DIR
#        rabbitmq-cluster.sh leader DIR QUEUE
#        rabbitmq-cluster.sh kill-leader DIR QUEUE
#        rabbitmq-cluster.sh status DIR
#        rabbitmq-cluster.sh ctl DIR N ARGS...
#
# start: nodes hare-BASEPORT-c1..c3@localhost on 127.0.0.1:BASEPORT..BASEPORT+2
# (Erlang distribution on PORT+20000), each started by rabbitmq-node.sh with
# its state under DIR/cN and one shared Erlang cookie; c2 and c3 then join c1
# (rabbitmqctl stop_app, join_cluster, start_app). Returns once every node
# lists three running nodes, and prints the comma-separated AMQP URL list.
# DIR must be new, empty or a former cluster's (which is wiped). The nodes
# live until `stop`, or until WATCH_PID exits if one is given (their watchdogs
# then also remove DIR/cN).
# stop: stops every node; keeps DIR (logs in DIR/cN/log, DIR/cN/out.log).
# kill: kill -9 node N's Erlang VM (beam.smp). restart: boots it again (it
# rejoins the cluster by itself); restart-down: every node that is not running.
# leader: prints the index of the node that leads quorum queue QUEUE;
# kill-leader kills that node and prints its index.
#
# Every node resends an unconfirmed at-least-once dead letter after
# HARE_DLX_CONFIRM_TIMEOUT_MS (default 5000; RabbitMQ's own default is 3 min),
# so that dead letters held back by a lost node move on soon after it is back.
# status: cluster_status as seen from the first node that answers.
# ctl: rabbitmqctl against node N, e.g. `ctl DIR 1 list_queues name type leader`.
set -euo pipefail

usage() { sed -n 5,12p "$0" | cut -c3- >&2; exit 2; }

here=$(cd "$(dirname "$0")" && pwd)
node_sh=$here/rabbitmq-node.sh
ctl_bin=/usr/lib/rabbitmq/bin/rabbitmqctl
NODES=3

# Reads DIR/cluster.env: BASEPORT, WATCH and the DIR's absolute path.
load() {
  dir=$1
  [ -f "$dir/cluster.env" ] || { echo "$dir holds no cluster (no cluster.env)" >&2; exit 2; }
  dir=$(cd "$dir" && pwd)
  # shellcheck source=/dev/null
  . "$dir/cluster.env"
}

name_of() { echo "hare-$BASEPORT-c$1"; }
port_of() { echo $((BASEPORT + $1 - 1)); }

# rabbitmqctl as the cluster's user: HOME holds the shared cookie.
ctl() {
  local n=$1
  shift
  HOME="$dir/c1" RABBITMQ_CONF_ENV_FILE=/nonexistent "$ctl_bin" -q -n "$(name_of "$n")@localhost" "$@"
}

# Boots node N (first boot, or again after a kill).
boot() {
  local n=$1
  HARE_RABBITMQ_COOKIE=$COOKIE "$node_sh" start "$(name_of "$n")" "$(port_of "$n")" "$dir/c$n" "$WATCH" \
    $(($(port_of "$n") + 20000)) >"$dir/c$n.bootpid"
}

# Running nodes as node N sees them.
running_count() {
  ctl "$1" cluster_status --formatter json 2>/dev/null |
    python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("running_nodes", [])))' 2>/dev/null || echo 0
}

wait_running() {
  local want=$1
  shift
  for _ in $(seq 120); do
    local ok=1
    for n in "$@"; do
      [ "$(running_count "$n")" = "$want" ] || { ok=0; break; }
    done
    [ $ok = 1 ] && return 0
    sleep 0.5
  done
  echo "the cluster in $dir did not reach $want running nodes" >&2
  return 1
}

# RabbitMQ reads it when a quorum queue's dead-letter worker starts.
tune() {
  ctl "$1" eval "application:set_env(rabbit, dead_letter_worker_publisher_confirm_timeout, ${HARE_DLX_CONFIRM_TIMEOUT_MS:-5000})." >/dev/null
}

urls() {
  local list=""
  for n in $(seq $NODES); do
    list="$list${list:+,}amqp://guest:guest@127.0.0.1:$(port_of "$n")/%2f"
  done
  echo "$list"
}

beam_pid() { cat "$dir/c$1/pid" 2>/dev/null; }

leader_of() {
  local queue=$1 out
  for n in $(seq $NODES); do
    if out=$(ctl "$n" list_queues name leader --no-table-headers 2>/dev/null); then
      local node
      node=$(printf '%s\n' "$out" | awk -v q="$queue" '$1 == q { print $2 }')
      for m in $(seq $NODES); do
        [ "$node" = "$(name_of "$m")@localhost" ] && { echo "$m"; return 0; }
      done
      echo "no quorum queue $queue with a leader (list_queues on c$n: $out)" >&2
      return 1
    fi
  done
  echo "no node answers" >&2
  return 1
}

kill_node() {
  local n=$1 pid
  pid=$(beam_pid "$n") || { echo "node c$n has no pid file" >&2; exit 1; }
  kill -KILL "$pid"
  echo "killed c$n ($(name_of "$n")@localhost, beam pid $pid, port $(port_of "$n"))" >&2
}

cmd=${1:-}
case "$cmd" in
start)
  [ $# -ge 3 ] || usage
  dir=$2 base=$3 watch=${4:-}
  if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
    if [ -f "$dir/cluster.env" ]; then
      "$0" stop "$dir" >/dev/null 2>&1 || true
      rm -rf "${dir:?}"/c[0-9] "${dir:?}"/c[0-9].bootpid "$dir/cluster.env" "$dir/keeper.pid"
    else
      echo "$dir is not empty and not a former cluster's dir; refusing to use it" >&2
      exit 2
    fi
  fi
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if [ -z "$watch" ]; then
    # Nodes outlive this script: their watchdogs watch a keeper that `stop` ends.
    setsid sleep infinity </dev/null >/dev/null 2>&1 &
    watch=$!
    echo "$watch" >"$dir/keeper.pid"
  fi
  COOKIE=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F)
  cat >"$dir/cluster.env" <<EOF
BASEPORT=$base
WATCH=$watch
COOKIE=$COOKIE
EOF
  load "$dir"
  trap '"$0" stop "$dir" >/dev/null 2>&1; exit 1' ERR INT TERM HUP
  # Boot the three nodes in parallel (each about 5 s alone).
  pids=()
  for n in $(seq $NODES); do
    boot "$n" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  for n in $(seq 2 $NODES); do
    ctl "$n" stop_app >/dev/null
    ctl "$n" join_cluster "$(name_of 1)@localhost" >/dev/null
    ctl "$n" start_app >/dev/null
  done
  wait_running $NODES $(seq $NODES)
  for n in $(seq $NODES); do tune "$n"; done
  trap - ERR INT TERM HUP
  echo "cluster of $NODES up in $dir: $(for n in $(seq $NODES); do printf '%s@localhost:%s ' "$(name_of "$n")" "$(port_of "$n")"; done)" >&2
  urls
  ;;
stop)
  [ $# -eq 2 ] || usage
  load "$2"
  for n in $(seq $NODES); do
    [ -d "$dir/c$n" ] && "$node_sh" stop "$dir/c$n"
  done
  if [ -f "$dir/keeper.pid" ]; then
    kill "$(cat "$dir/keeper.pid")" 2>/dev/null || true
    rm -f "$dir/keeper.pid"
  fi
  ;;
kill)
  [ $# -eq 3 ] || usage
  load "$2"
  kill_node "$3"
  ;;
restart)
  [ $# -eq 3 ] || usage
  load "$2"
  boot "$3"
  wait_running $NODES "$3"
  tune "$3"
  echo "c$3 is back; the cluster runs $NODES nodes" >&2
  ;;
restart-down)
  [ $# -eq 2 ] || usage
  load "$2"
  for n in $(seq $NODES); do
    pid=$(beam_pid "$n" || true)
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
      "$0" restart "$dir" "$n"
    fi
  done
  ;;
leader)
  [ $# -eq 3 ] || usage
  load "$2"
  leader_of "$3"
  ;;
kill-leader)
  [ $# -eq 3 ] || usage
  load "$2"
  n=$(leader_of "$3")
  kill_node "$n"
  echo "$n"
  ;;
status)
  [ $# -eq 2 ] || usage
  load "$2"
  for n in $(seq $NODES); do
    ctl "$n" cluster_status 2>/dev/null && exit 0
  done
  echo "no node answers" >&2
  exit 1
  ;;
urls)
  [ $# -eq 2 ] || usage
  load "$2"
  urls
  ;;
ctl)
  [ $# -ge 4 ] || usage
  load "$2"
  n=$3
  shift 3
  ctl "$n" "$@"
  ;;
*) usage ;;
esac
