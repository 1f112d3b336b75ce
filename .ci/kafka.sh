#!/usr/bin/env bash
# Fetch, start and stop a real single-node Apache Kafka (KRaft) broker for armd's integration tests and CI.
#
#   .ci/kafka.sh fetch            download the broker jars from Maven Central (once; cached)
#   .ci/kafka.sh start DIR        fresh broker in DIR on free 127.0.0.1 ports; prints 127.0.0.1:PORT
#   .ci/kafka.sh restart DIR      start DIR's broker again: same ports, same data (stops it first if running)
#   .ci/kafka.sh stop DIR         SIGTERM, wait up to 30 s, then SIGKILL
#   .ci/kafka.sh kill DIR         SIGKILL immediately (simulated crash)
#   .ci/kafka.sh status DIR       exit 0 if DIR's broker is running
#
# Files in DIR: server.properties, log4j2.properties, data/ (log.dirs), broker.log (stdout+stderr),
# broker.pid, bootstrap ("127.0.0.1:PORT", no newline), ports ("PORT CPORT").
#
# Environment:
#   ARMD_KAFKA_LIBS           jar cache   (default $HOME/.cache/armd/kafka-4.4.0/libs)
#   ARMD_KAFKA_HEAP_OPTS      JVM heap    (default "-Xms128m -Xmx512m")
#   ARMD_KAFKA_JVM_OPTS       other JVM options (default "-XX:TieredStopAtLevel=1": C1 only, starts ~3 s
#                             faster on 2 cores; set to "" for the JVM's defaults)
#   ARMD_KAFKA_START_TIMEOUT  seconds to wait for the broker to come up (default 90)
#   ARMD_KAFKA_STOP_TIMEOUT   seconds to wait after SIGTERM before SIGKILL (default 30)
#   JAVA                      java binary (default: java on PATH)
set -euo pipefail

KAFKA_VERSION=4.4.0
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
POM="$SCRIPT_DIR/kafka/pom.xml"
LIBS=${ARMD_KAFKA_LIBS:-$HOME/.cache/armd/kafka-$KAFKA_VERSION/libs}
MARKER="$LIBS/.armd-complete"
HEAP_OPTS=${ARMD_KAFKA_HEAP_OPTS:--Xms128m -Xmx512m}
JVM_OPTS=${ARMD_KAFKA_JVM_OPTS--XX:TieredStopAtLevel=1}
START_TIMEOUT=${ARMD_KAFKA_START_TIMEOUT:-90}
STOP_TIMEOUT=${ARMD_KAFKA_STOP_TIMEOUT:-30}
JAVA=${JAVA:-java}

die() { echo "kafka.sh: $*" >&2; exit 1; }
log() { echo "kafka.sh: $*" >&2; }

usage() {
  sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# ---------------------------------------------------------------------------------------------- fetch
fetch() {
  [[ -f "$MARKER" ]] && return 0
  command -v mvn >/dev/null || die "mvn not found (needed once, to download the Kafka jars)"
  local parent lock tmp
  parent=$(dirname "$LIBS")
  mkdir -p "$parent"
  lock="$parent/.fetch.lock"
  # Serialise concurrent fetches (two test runs at once); re-check the marker under the lock.
  exec 9>"$lock"
  flock 9
  if [[ ! -f "$MARKER" ]]; then
    log "fetching Apache Kafka $KAFKA_VERSION jars into $LIBS"
    tmp="$LIBS.tmp.$$"
    rm -rf "$tmp"
    # mvn's output is shown only on failure (-q still prints stray ANSI codes).
    if ! mvn -B -q -Dstyle.color=never -f "$POM" dependency:copy-dependencies -DoutputDirectory="$tmp" \
         >"$tmp.mvn.log" 2>&1; then
      cat "$tmp.mvn.log" >&2
      rm -rf "$tmp" "$tmp.mvn.log"
      die "mvn dependency:copy-dependencies failed"
    fi
    rm -f "$tmp.mvn.log"
    ls "$tmp"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null 2>&1 || { rm -rf "$tmp"; die "kafka jar missing after fetch"; }
    rm -rf "$LIBS"                      # a partial copy from an interrupted run, if any
    mv "$tmp" "$LIBS"
    echo "$KAFKA_VERSION" >"$MARKER"    # written only after success
  fi
  flock -u 9
  exec 9>&-
}

# ------------------------------------------------------------------------------------------ helpers
abs_dir() { [[ -d "$1" ]] || die "no such directory: $1"; (cd "$1" && pwd); }

# Two distinct free TCP ports on 127.0.0.1 (both sockets held open together so they differ).
free_ports() {
  python3 - <<'EOF'
import socket
socks = []
for _ in range(2):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

# Kafka cluster id: 16 random bytes, URL-safe base64 without padding, not starting with '-'
# (same format as `kafka.tools.StorageTool random-uuid`, without paying ~2.5 s of JVM start-up).
cluster_id() {
  python3 - <<'EOF'
import base64, uuid
while True:
    s = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not s.startswith("-"):
        print(s)
        break
EOF
}

# Alive = exists and is not a zombie (in a container whose PID 1 does not reap orphans, a dead broker
# can linger as a zombie, and `kill -0` still succeeds on it).
alive() {
  kill -0 "$1" 2>/dev/null || return 1
  [[ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]]
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# PID of DIR's broker if it is alive (and really is that broker), else nothing; exit status 0/1.
broker_pid() {
  local dir=$1 pid
  [[ -f "$dir/broker.pid" ]] || return 1
  pid=$(<"$dir/broker.pid")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  alive "$pid" || return 1
  # Guard against PID reuse: the process must be kafka.Kafka with this DIR's config.
  local cmdline
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ "$cmdline" == *"kafka.Kafka $dir/server.properties"* ]] || return 1
  echo "$pid"
}

fail_with_log() {
  local dir=$1; shift
  echo "kafka.sh: $*" >&2
  if [[ -f "$dir/broker.log" ]]; then
    echo "----- last 60 lines of $dir/broker.log -----" >&2
    tail -n 60 "$dir/broker.log" >&2 || true
    echo "-----" >&2
  fi
  exit 1
}

write_config() {
  local dir=$1 port=$2 cport=$3
  cat >"$dir/server.properties" <<EOF
# Single-node KRaft broker for armd tests (written by .ci/kafka.sh).
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data

num.partitions=1
default.replication.factor=1
auto.create.topics.enable=true
delete.topic.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0

# After kafka.sh kill, the restarted controller refuses the broker's re-registration until the old
# session expires (default 9 s); a shorter session makes the outage test's restart faster.
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000

# Small segments; nothing is kept for long in tests.
log.segment.bytes=16777216
log.retention.hours=24
log.retention.check.interval.ms=300000
num.io.threads=4
num.network.threads=2
num.recovery.threads.per.data.dir=1
EOF
  cat >"$dir/log4j2.properties" <<'EOF'
status = warn
appender.stdout.type = Console
appender.stdout.name = STDOUT
appender.stdout.layout.type = PatternLayout
appender.stdout.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
EOF
}

# Launch the JVM for an already configured+formatted DIR and wait until it serves.
launch() {
  local dir=$1 port cport pid deadline
  read -r port cport <"$dir/ports"
  port_open "$port" && die "port $port on 127.0.0.1 is already in use (another broker?)"
  port_open "$cport" && die "controller port $cport on 127.0.0.1 is already in use"
  {
    echo "===== kafka.sh launch $(date -u +%Y-%m-%dT%H:%M:%SZ) ====="
  } >>"$dir/broker.log"
  local start_line
  start_line=$(wc -l <"$dir/broker.log")
  # shellcheck disable=SC2086  # HEAP_OPTS / JVM_OPTS are word lists on purpose
  setsid "$JAVA" $HEAP_OPTS -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$dir/log4j2.properties" $JVM_OPTS \
    -cp "$LIBS/*" kafka.Kafka "$dir/server.properties" \
    </dev/null >>"$dir/broker.log" 2>&1 &
  pid=$!
  echo "$pid" >"$dir/broker.pid"

  deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    if ! alive "$pid"; then
      rm -f "$dir/broker.pid"
      fail_with_log "$dir" "broker exited during start-up"
    fi
    # (awk reads the whole file: a `tail | grep -q` pipeline can die of SIGPIPE under pipefail)
    if awk -v from="$start_line" 'NR > from && /Kafka Server started/ { found = 1 } END { exit !found }' \
         "$dir/broker.log" && port_open "$port"; then
      break
    fi
    if ((SECONDS >= deadline)); then
      kill -KILL "$pid" 2>/dev/null || true
      wait_gone "$pid"
      rm -f "$dir/broker.pid"
      fail_with_log "$dir" "broker not ready after ${START_TIMEOUT}s (killed it)"
    fi
    sleep 0.2
  done
  printf '127.0.0.1:%s' "$port" >"$dir/bootstrap"
  echo "127.0.0.1:$port"
}

# ------------------------------------------------------------------------------------------ commands
cmd_start() {
  local dir ports port cport cid
  mkdir -p "$1"
  dir=$(abs_dir "$1")
  broker_pid "$dir" >/dev/null && die "a broker is already running in $dir (pid $(<"$dir/broker.pid"))"
  fetch
  command -v "$JAVA" >/dev/null || die "java not found"
  # Fresh state: remove only what this script owns.
  rm -rf "$dir/data" "$dir/server.properties" "$dir/log4j2.properties" "$dir/bootstrap" \
         "$dir/ports" "$dir/broker.pid" "$dir/broker.log"
  mkdir -p "$dir/data"
  ports=$(free_ports)
  read -r port cport <<<"$ports"
  echo "$port $cport" >"$dir/ports"
  write_config "$dir" "$port" "$cport"
  cid=$(cluster_id)
  # Static quorum (controller.quorum.voters) => `format -t ID -c FILE`, no --standalone.
  # shellcheck disable=SC2086
  if ! "$JAVA" -Xmx256m $JVM_OPTS -Dlog4j2.configurationFile="$dir/log4j2.properties" -cp "$LIBS/*" \
        kafka.tools.StorageTool format -t "$cid" -c "$dir/server.properties" \
        >>"$dir/broker.log" 2>&1; then
    fail_with_log "$dir" "kafka-storage format failed"
  fi
  launch "$dir"
}

cmd_restart() {
  local dir
  dir=$(abs_dir "$1")
  [[ -f "$dir/server.properties" && -f "$dir/ports" && -d "$dir/data" ]] \
    || die "$dir has no broker to restart (run: kafka.sh start $dir)"
  if broker_pid "$dir" >/dev/null; then
    cmd_stop "$dir"
  fi
  [[ -f "$MARKER" ]] || fetch
  launch "$dir"
}

cmd_stop() {
  local dir pid deadline
  [[ -d "$1" ]] || return 0          # nothing was ever started there
  dir=$(abs_dir "$1")
  if ! pid=$(broker_pid "$dir"); then
    rm -f "$dir/broker.pid"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  deadline=$((SECONDS + STOP_TIMEOUT))
  while alive "$pid"; do
    if ((SECONDS >= deadline)); then
      log "broker $pid did not stop within ${STOP_TIMEOUT}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      wait_gone "$pid"
      break
    fi
    sleep 0.2
  done
  rm -f "$dir/broker.pid"
}

wait_gone() {
  local pid=$1 i
  for ((i = 0; i < 100; i++)); do
    alive "$pid" || return 0
    sleep 0.1
  done
}

cmd_kill() {
  local dir pid
  [[ -d "$1" ]] || return 0          # nothing was ever started there
  dir=$(abs_dir "$1")
  if pid=$(broker_pid "$dir"); then
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid"
  fi
  rm -f "$dir/broker.pid"
}

cmd_status() {
  local dir pid
  dir=$(abs_dir "$1")
  if pid=$(broker_pid "$dir"); then
    echo "running pid=$pid bootstrap=$(cat "$dir/bootstrap" 2>/dev/null || echo '?')"
  else
    echo "stopped"
    return 1
  fi
}

case "${1:-}" in
  fetch)   [[ $# -eq 1 ]] || usage; fetch ;;
  start)   [[ $# -eq 2 ]] || usage; cmd_start "$2" ;;
  restart) [[ $# -eq 2 ]] || usage; cmd_restart "$2" ;;
  stop)    [[ $# -eq 2 ]] || usage; cmd_stop "$2" ;;
  kill)    [[ $# -eq 2 ]] || usage; cmd_kill "$2" ;;
  status)  [[ $# -eq 2 ]] || usage; cmd_status "$2" ;;
  *) usage ;;
esac
