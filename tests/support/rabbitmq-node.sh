#!/usr/bin/env bash
# A private, throwaway RabbitMQ node (Debian's rabbitmq-server) on loopback,
# for tests that compare Hare with RabbitMQ.
#
# usage: rabbitmq-node.sh start NAME PORT DIR [WATCH_PID [DIST_PORT]]
#        rabbitmq-node.sh stop DIR
#
# start: node NAME@localhost on 127.0.0.1:PORT with all its state under DIR
# (created; must be new, empty or a former node's). Prints the node's pid once
# it has booted. A watchdog stops the node and removes DIR when WATCH_PID
# (default: the caller) exits, so a crashed or interrupted test leaves nothing.
# DIST_PORT (Erlang distribution) defaults to PORT+20000 (pass one if PORT > 45535).
# stop: stops the node started in DIR and its watchdog; keeps DIR.
set -euo pipefail

usage() { sed -n 5,6p "$0" | cut -c3- >&2; exit 2; }

# The Debian package's real start script. /usr/sbin/rabbitmq-server is a
# wrapper that, run as root, su's to the rabbitmq user, and su resets HOME:
# the Erlang cookie would then be the system node's. Calling the real script
# runs the node as the caller, with HOME=DIR.
server=/usr/lib/rabbitmq/bin/rabbitmq-server

# Checks the real script, not `command -v rabbitmq-server`: /usr/sbin is often
# not on a non-root user's PATH.
install_rabbitmq() {
  [ -x "$server" ] && return 0
  # Tests in one binary start nodes in parallel; apt allows one install at a time.
  exec 9>/tmp/hare-rabbitmq-install.lock
  flock 9
  if ! [ -x "$server" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y rabbitmq-server >&2 || { apt-get update >&2 && apt-get install -y rabbitmq-server >&2; }
  fi
  exec 9>&-
  [ -x "$server" ] || { echo "rabbitmq-server installed, but $server is missing" >&2; exit 1; }
}

# True while process $1 runs (a zombie, exited but not yet reaped, counts as gone).
alive() {
  kill -0 "$1" 2>/dev/null && [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)" != Z ]
}

# SIGTERM to the node's process group (launcher script and beam), SIGKILL if it
# has not gone after 10 s.
kill_group() {
  local pgid=$1
  kill -TERM -- "-$pgid" 2>/dev/null || return 0
  for _ in $(seq 100); do
    kill -0 -- "-$pgid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL -- "-$pgid" 2>/dev/null || true
}

cmd=${1:-}
case "$cmd" in
start)
  [ $# -ge 4 ] || usage
  name=$2 port=$3 dir=$4 watch=${5:-$PPID} dist=${6:-$(($3 + 20000))}
  if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ] && ! [ -f "$dir/enabled_plugins" ]; then
    echo "$dir is not empty and not a RabbitMQ node's dir; refusing to use (the watchdog removes it)" >&2
    exit 2
  fi
  install_rabbitmq
  mkdir -p "$dir/mnesia" "$dir/log"
  dir=$(cd "$dir" && pwd)
  echo '[].' >"$dir/enabled_plugins"
  rm -f "$dir/pid" "$dir/out.log"
  export RABBITMQ_NODENAME="$name@localhost" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$port" \
    RABBITMQ_DIST_PORT="$dist" RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_PID_FILE="$dir/pid" RABBITMQ_FEATURE_FLAGS_FILE="$dir/feature_flags" \
    RABBITMQ_PLUGINS_EXPAND_DIR="$dir/plugins-expand" RABBITMQ_CONFIG_FILE="$dir/rabbitmq" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" HOME="$dir"
  # Interrupted before the watchdog runs, nothing else would stop the node.
  trap '"$0" stop "$dir"; exit 130' INT TERM HUP
  # Own session: Ctrl-C on the test's terminal reaches the test, not the node
  # (the watchdog stops it then). Its pid is the group's id.
  setsid "$server" >"$dir/out.log" 2>&1 </dev/null &
  pgid=$!
  echo "$pgid" >"$dir/pgid"
  # Started before the wait, so a test that dies while the node boots leaves nothing.
  setsid "$0" watch "$watch" "$pgid" "$dir" </dev/null >/dev/null 2>&1 &
  for _ in $(seq 600); do
    if grep -q "completed with" "$dir/out.log" 2>/dev/null && [ -s "$dir/pid" ]; then
      printf '%s\n' "$(cat "$dir/pid")" # the file has no newline
      exit 0
    fi
    kill -0 -- "-$pgid" 2>/dev/null || break
    sleep 0.1
  done
  echo "rabbitmq $name did not start on port $port; $dir/out.log ends with:" >&2
  tail -n 30 "$dir/out.log" >&2 || true
  "$0" stop "$dir"
  exit 1
  ;;
watch) # internal: watch WATCH_PID PGID DIR
  [ $# -eq 4 ] || usage
  watch=$2 pgid=$3 dir=$4
  echo $$ >"$dir/watchdog.pid"
  while alive "$watch" && kill -0 -- "-$pgid" 2>/dev/null; do sleep 1; done
  if ! alive "$watch"; then
    kill_group "$pgid"
    rm -rf "$dir"
  fi
  ;;
stop)
  [ $# -eq 2 ] || usage
  dir=$2
  if [ -f "$dir/watchdog.pid" ]; then
    kill "$(cat "$dir/watchdog.pid")" 2>/dev/null || true
    rm -f "$dir/watchdog.pid"
  fi
  [ -f "$dir/pgid" ] && kill_group "$(cat "$dir/pgid")"
  exit 0
  ;;
*) usage ;;
esac
