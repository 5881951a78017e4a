#!/usr/bin/env bash
# Benchmarks (issue 6): builds release, then runs each scenario against the CloudHub simulator in
# load mode over mutual TLS on 127.0.0.1 and writes bench-results/<time>.md (the table) and
# <time>.jsonl (one line per scenario) plus <time>-lines.jsonl (every stats line of both ends).
#   idle            the device binary (`edgehub run`, default modules) connected and idle
#   edge→cloud      edgehub-bench --rate 1k, 10k, 30k, max (the cloud measures arrival)
#   cloud→edge      the simulator sends 1k, 10k, 20k, max per second, ack class, 256 in flight;
#                   the bench's sink ACKs each at once
#   sync c1, c16    request/response with 1 and 16 in flight (the simulator answers at once)
#   durable         cloud→edge at max through the real resource store (fsync, then ACK)
#   mqtt→cloud      1k/s and max MQTT publishes through mosquitto and the EventBus (device binary)
#   twin reports    1k/s and max twin reports of a mapper (100 devices) through mosquitto and the
#                   DeviceTwin (store, result, edge_updated) to the cloud (device binary)
# Each load scenario runs BENCH_SECS (20) seconds, idle BENCH_IDLE_SECS (60); about 5 minutes in
# all after the build. The bench raises messageQPS/messageBurst (see edgehub-bench's bench_config
# line). Usage: scripts/bench.sh [scenario-name-filter]   e.g. scripts/bench.sh 'sync|idle'
#
# Compare mode (issue 14): scripts/bench.sh compare BEFORE AFTER [scenario-name-filter]
# runs each chosen scenario BENCH_RUNS (3) times with each of two builds, before and after back to
# back (so both see the same load on the host; odd rounds run before first, even rounds after
# first, as the second run of a pair can be slower for it: durable ingest was ×1.20 one way round
# and ×1.10 the other), against this tree's simulator, and prints one line
# per scenario: the median of the paired after/before ratios of CPU per message, and medians of
# CPU µs per message or request (whole process, and the agent's threads without the bench's own),
# rate, p50 latency, the after/before ratio and the load average. BEFORE and AFTER are folders
# holding release builds of `edgehub-bench` (and `edgehub`, for idle), or paths of edgehub-bench
# binaries (idle then uses the `edgehub` beside each). Results stay in bench-results/.
#   e.g. scripts/bench.sh compare before-bin target/release 'edge→cloud 10k'
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${BENCH_SECS:-20}
idle_secs=${BENCH_IDLE_SECS:-60}
mode=table
if [ "${1:-}" = compare ]; then
  mode=compare
  [ $# -ge 3 ] || { echo "usage: scripts/bench.sh compare BEFORE AFTER [scenario-name-filter]" >&2; exit 2; }
  side_dir() { if [ -d "$1" ]; then (cd "$1" && pwd); else (cd "$(dirname "$1")" && pwd); fi; }
  side_bench() { if [ -d "$1" ]; then echo "$(side_dir "$1")/edgehub-bench"; else echo "$(side_dir "$1")/$(basename "$1")"; fi; }
  before_bench=$(side_bench "$2") before_device=$(side_dir "$2")/edgehub
  after_bench=$(side_bench "$3") after_device=$(side_dir "$3")/edgehub
  for f in "$before_bench" "$after_bench"; do [ -x "$f" ] || { echo "bench: no binary $f" >&2; exit 2; }; done
  shift 3
fi
only=${1:-}

bash scripts/setup.sh
echo "bench: building release binaries" >&2
cargo build --release --quiet --bin edgehub
work=$(mktemp -d /tmp/edgehub-bench.XXXXXX)
cp target/release/edgehub "$work/edgehub-device"
cargo build --release --quiet --features cloudsim --bin edgehub-cloudsim --bin edgehub-bench \
  --bin edgehub-mqtt-load
bin=target/release
bench_bin=$bin/edgehub-bench
device_bin=$work/edgehub-device

mkdir -p bench-results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
results=bench-results/$stamp.jsonl
lines=bench-results/$stamp-lines.jsonl
table=bench-results/$stamp.md
: >"$results"
: >"$lines"

sim_pid="" agent_pid=""
cleanup() {
  exec 3>&- 2>/dev/null || true
  [ -z "$agent_pid" ] || kill "$agent_pid" 2>/dev/null || true
  [ -z "$sim_pid" ] || kill "$sim_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin/edgehub-cloudsim" gen-certs --dir "$work/pki" --node bench-gw >/dev/null
pki=$work/pki

# Starts the simulator with the given flags; commands go to fd 3, its stdout to $work/sim.out.
start_sim() {
  rm -f "$work/sim.ctl"
  mkfifo -m 600 "$work/sim.ctl"
  "$bin/edgehub-cloudsim" --listen 127.0.0.1:0 --ca "$pki/ca.crt" --cert "$pki/server.crt" \
    --key "$pki/server.key" "$@" <"$work/sim.ctl" >"$work/sim.out" 2>"$work/sim.err" &
  sim_pid=$!
  exec 3>"$work/sim.ctl"
  for _ in $(seq 100); do grep -q '"listening"' "$work/sim.out" 2>/dev/null && break; sleep 0.1; done
  addr=$(grep -o '"addr":"[0-9.:]*"' "$work/sim.out" | head -1 | cut -d'"' -f4)
  [ -n "$addr" ] || { echo "bench: simulator did not start"; cat "$work/sim.err"; exit 1; }
}

stop_sim() {
  echo quit >&3
  exec 3>&-
  wait "$sim_pid" || true
  sim_pid=""
}

# The filter may list several substrings separated by '|': 'sync|idle'.
wanted() {
  [ -z "$only" ] && return 0
  local part
  IFS='|' read -ra parts <<<"$only"
  for part in "${parts[@]}"; do [[ "$1" == *"$part"* ]] && return 0; done
  return 1
}

# In compare mode, runs a scenario BENCH_RUNS times with each build, back to back, the build that
# goes first alternating by round. Results go to one file per build, so runs stay paired by order.
compare_pairs() {
  local sides
  for round in $(seq "${BENCH_RUNS:-3}"); do
    if [ $((round % 2)) -eq 1 ]; then sides="before after"; else sides="after before"; fi
    for side in $sides; do
      echo "bench: compare round $round, $side" >&2
      results=bench-results/$stamp-$side.jsonl
      if [ "$side" = before ]; then bench_bin=$before_bench device_bin=$before_device; else bench_bin=$after_bench device_bin=$after_device; fi
      "$@"
    done
  done
}

# run_load NAME KIND OFFERED "SIM FLAGS" "BENCH FLAGS"
run_load() {
  if [ "$mode" = compare ] && [ -z "${in_pair:-}" ]; then
    wanted "$1" || return 0
    in_pair=1 compare_pairs run_load "$@"
    return 0
  fi
  local name=$1 kind=$2 offered=$3 sim_flags=$4 bench_flags=$5
  wanted "$name" || return 0
  echo "bench: $name ($secs s)" >&2
  # shellcheck disable=SC2086 # the flag lists are meant to split
  start_sim $sim_flags
  # shellcheck disable=SC2086
  "$bench_bin" --server "$addr" --ca "$pki/ca.crt" --cert "$pki/client.crt" \
    --key "$pki/client.key" --duration "$secs" --label "$name" $bench_flags >"$work/bench.out" ||
    { echo "bench: $name failed"; cat "$work/bench.out"; }
  stop_sim
  local bench_summary sim_summary
  bench_summary=$(grep '"bench_summary"' "$work/bench.out" || echo null)
  sim_summary=$(grep '"load_summary"' "$work/sim.out" || echo null)
  printf '{"scenario":"%s","kind":"%s","offered":"%s","loadavg":"%s","bench":%s,"sim":%s}\n' \
    "$name" "$kind" "$offered" "$(cut -d' ' -f1 /proc/loadavg)" "$bench_summary" "$sim_summary" >>"$results"
  sed "s/^{/{\"scenario\":\"$name\",\"side\":\"edge\",/" "$work/bench.out" >>"$lines"
  grep -E '"load_(stats|summary)"' "$work/sim.out" |
    sed "s/^{/{\"scenario\":\"$name\",\"side\":\"cloud\",/" >>"$lines" || true
}

run_idle() {
  wanted "idle" || return 0
  if [ "$mode" = compare ] && [ -z "${in_pair:-}" ]; then
    in_pair=1 compare_pairs run_idle
    return 0
  fi
  echo "bench: idle ($idle_secs s)" >&2
  start_sim
  cat >"$work/config.json" <<JSON
{"nodeName": "bench-gw", "websocket": {"server": "$addr"}, "stateDir": "$work/state",
 "localApiSocket": "$work/edgehub.sock",
 "tlsCaFile": "$pki/ca.crt", "tlsCertFile": "$pki/client.crt", "tlsPrivateKeyFile": "$pki/client.key"}
JSON
  "$device_bin" run --config "$work/config.json" 2>"$work/agent.log" &
  agent_pid=$!
  for _ in $(seq 100); do grep -q '"event":"connected"' "$work/sim.out" && break; sleep 0.1; done
  grep -q '"event":"connected"' "$work/sim.out" || { echo "bench: agent did not connect"; cat "$work/agent.log"; exit 1; }
  local cpu0 cpu1
  cpu0=$(awk '{print $14 + $15}' "/proc/$agent_pid/stat")
  sleep "$idle_secs"
  cpu1=$(awk '{print $14 + $15}' "/proc/$agent_pid/stat")
  field() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$agent_pid/$2"; }
  printf '{"scenario":"idle %s s","kind":"idle","loadavg":"%s","idle":{"idle_s":%s,"cpu_s":%s,"vmrss_kb":%s,"vmhwm_kb":%s,"rss_anon_kb":%s,"pss_kb":%s,"uss_kb":%s,"threads":%s}}\n' \
    "$idle_secs" "$(cut -d' ' -f1 /proc/loadavg)" "$idle_secs" "$(awk -v a="$cpu0" -v b="$cpu1" -v t="$(getconf CLK_TCK)" 'BEGIN{printf "%.2f", (b-a)/t}')" \
    "$(field VmRSS status)" "$(field VmHWM status)" "$(field RssAnon status)" \
    "$(field Pss smaps_rollup)" \
    "$(awk '$1 == "Private_Clean:" || $1 == "Private_Dirty:" {kb += $2} END {print kb + 0}' "/proc/$agent_pid/smaps_rollup")" \
    "$(field Threads status)" >>"$results"
  cp "/proc/$agent_pid/smaps_rollup" "bench-results/$stamp-idle-smaps_rollup.txt"
  kill "$agent_pid"
  wait "$agent_pid" || true
  agent_pid=""
  stop_sim
}

# MQTT→cloud (issue 13): the device binary (`edgehub run`) with the EventBus on, a mosquitto
# broker, and edgehub-mqtt-load publishing bench content at QoS 1 on an upload topic
# (default/user/bench) at OFFERED per second (-1: as fast as the broker takes them). The cloud
# counts what arrives; the agent's CPU and memory are read from /proc, its drops from
# `edgehub status --json`.   run_mqtt NAME OFFERED [TWIN_DEVICES]
# With TWIN_DEVICES (issue 13, DeviceTwin), the cloud first adds devices bench-0… to the node and
# the publisher acts as a mapper reporting one twin of each device in turn (every report is a
# durable write, a result publish and an `edge_updated`); the cloud counts the reports that reach
# it. Reports of one device waiting together in the outbox are coalesced (latest wins), which the
# table shows as lost.
run_mqtt() {
  local name=$1 offered=$2 twin_devices=${3:-0}
  wanted "$name" || return 0
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] ||
    { echo "bench: $name skipped: no mosquitto (scripts/setup.sh installs it)" >&2; return 0; }
  echo "bench: $name ($secs s)" >&2
  local port mosq_pid
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  printf 'user root\nlistener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n' \
    "$port" >"$work/mosquitto.conf"
  "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$work/mosquitto.conf" 2>"$work/mosquitto.log" &
  mosq_pid=$!
  start_sim --send-rate 0
  cat >"$work/mqtt-config.json" <<JSON
{"nodeName": "bench-gw", "websocket": {"server": "$addr"}, "stateDir": "$work/mqtt-state",
 "localApiSocket": "$work/mqtt.sock", "messageQPS": 10000000, "messageBurst": 1000000,
 "tlsCaFile": "$pki/ca.crt", "tlsCertFile": "$pki/client.crt", "tlsPrivateKeyFile": "$pki/client.key",
 "eventBus": {"mqttServerExternal": "tcp://127.0.0.1:$port"}}
JSON
  "$work/edgehub-device" run --config "$work/mqtt-config.json" 2>"$work/mqtt-agent.log" &
  agent_pid=$!
  agent_status() {
    "$work/edgehub-device" status --json --socket "$work/mqtt.sock" 2>/dev/null |
      python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin), separators=(",", ":")))' 2>/dev/null ||
      echo '{}'
  }
  for _ in $(seq 100); do
    agent_status | grep -q '"mqtt":{"connected":true' && break
    sleep 0.1
  done
  if [ "$twin_devices" -gt 0 ]; then
    local devices="" i
    for i in $(seq 0 $((twin_devices - 1))); do devices="$devices${devices:+,}{\"id\":\"bench-$i\",\"name\":\"bench-$i\"}"; done
    echo "push bench-gw {\"header\":{\"msg_id\":\"$(cat /proc/sys/kernel/random/uuid)\",\"timestamp\":0},\"route\":{\"source\":\"devicecontroller\",\"group\":\"twin\",\"operation\":\"update\",\"resource\":\"membership\"},\"content\":{\"event_id\":\"bench\",\"timestamp\":0,\"added_devices\":[$devices],\"removed_devices\":null}}" >&3
    for _ in $(seq 200); do
      [ "$(find "$work/mqtt-state/twin" -name '*.json' 2>/dev/null | wc -l)" -ge "$twin_devices" ] && break
      sleep 0.1
    done
  fi
  local cpu0 cpu1 t0 t1
  cpu0=$(awk '{print $14 + $15}' "/proc/$agent_pid/stat")
  t0=$(date +%s.%N)
  "$bin/edgehub-mqtt-load" --broker "tcp://127.0.0.1:$port" --rate "$offered" --duration "$secs" \
    --twin-devices "$twin_devices" \
    >"$work/mqtt-load.out" || { echo "bench: $name: publisher failed"; cat "$work/mqtt-load.out"; }
  # What the broker still holds (the agent applies back-pressure) reaches the agent and the cloud:
  # wait until the agent has received every publish and its outbox is empty (30 s at most).
  local want
  want=$(grep -o '"sent":[0-9]*' "$work/mqtt-load.out" | cut -d: -f2)
  for _ in $(seq 300); do
    agent_status | python3 -c 'import json, sys; s = json.load(sys.stdin)
sys.exit(0 if s.get("mqtt", {}).get("received", 0) >= int(sys.argv[1]) and s["outbox"]["messages"] == 0 else 1)' \
      "${want:-0}" && break
    sleep 0.1
  done
  cpu1=$(awk '{print $14 + $15}' "/proc/$agent_pid/stat")
  t1=$(date +%s.%N)
  local status load field_rss field_hwm threads
  status=$(agent_status)
  load=$(grep '"mqtt_load_summary"' "$work/mqtt-load.out" || echo '{}')
  field_rss=$(awk '$1 == "VmRSS:" {print $2}' "/proc/$agent_pid/status")
  field_hwm=$(awk '$1 == "VmHWM:" {print $2}' "/proc/$agent_pid/status")
  threads=$(awk '$1 == "Threads:" {print $2}' "/proc/$agent_pid/status")
  kill "$agent_pid"
  wait "$agent_pid" || true
  agent_pid=""
  stop_sim
  kill "$mosq_pid" 2>/dev/null || true
  wait "$mosq_pid" 2>/dev/null || true
  local sent cpu_s cpu_pct
  sent=$(echo "$load" | grep -o '"sent":[0-9]*' | cut -d: -f2)
  cpu_s=$(awk -v a="$cpu0" -v b="$cpu1" 'BEGIN{printf "%.2f", (b-a)/100}')
  cpu_pct=$(awk -v c="$cpu_s" -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", c/(b-a)*100}')
  printf '{"scenario":"%s","kind":"e2c","offered":"%s","loadavg":"%s","bench":{"sent":%s,"cpu_s":%s,"cpu_pct":%s,"vmrss_kb":%s,"vmhwm_kb":%s,"threads":%s,"publisher":%s,"agent_status":%s},"sim":%s}\n' \
    "$name" "$offered" "$(cut -d' ' -f1 /proc/loadavg)" "${sent:-0}" "$cpu_s" "$cpu_pct" \
    "${field_rss:-0}" "${field_hwm:-0}" "${threads:-0}" "$load" "$status" \
    "$(grep '"load_summary"' "$work/sim.out" || echo null)" >>"$results"
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
run_scenarios() {
run_idle
run_load "edge→cloud 1k" e2c 1000 "--send-rate 0" "--rate 1000"
run_load "edge→cloud 10k" e2c 10000 "--send-rate 0" "--rate 10000"
run_load "edge→cloud 30k" e2c 30000 "--send-rate 0" "--rate 30000"
run_load "edge→cloud max" e2c max "--send-rate 0" "--rate -1"
ack="--send-class ack --ack-window 256"
run_load "cloud→edge 1k ack" c2e 1000 "--send-rate 1000 $ack" "--rate 0"
run_load "cloud→edge 10k ack" c2e 10000 "--send-rate 10000 $ack" "--rate 0"
run_load "cloud→edge 20k ack" c2e 20000 "--send-rate 20000 $ack" "--rate 0"
run_load "cloud→edge max ack" c2e max "--send-rate -1 $ack" "--rate 0"
run_load "sync c1" sync "1 in flight" "--send-rate 0" "--sync --concurrency 1"
run_load "sync c16" sync "16 in flight" "--send-rate 0" "--sync --concurrency 16"
run_load "durable store ingest" durable max "--send-rate -1 $ack" "--durable"
}

if [ "$mode" = compare ]; then
  all_results=$results
  run_scenarios
  rm -f "$all_results"
  echo "# before $before_bench, after $after_bench" | tee "bench-results/$stamp-compare.txt"
  "$bin/edgehub-bench" compare "bench-results/$stamp-before.jsonl" "bench-results/$stamp-after.jsonl" |
    tee -a "bench-results/$stamp-compare.txt"
  echo "bench: wrote bench-results/$stamp-{before,after}.jsonl, $lines and $stamp-compare.txt" >&2
  exit 0
fi
run_scenarios
# The device binary behind mosquitto (not paired in compare mode).
run_mqtt "mqtt→cloud 1k" 1000
run_mqtt "mqtt→cloud max" -1
run_mqtt "twin reports→cloud 1k" 1000 100
run_mqtt "twin reports→cloud max" -1 100

{
  echo "# edgehub benchmarks, $stamp"
  echo
  echo "Host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -sr);" \
    "$(openssl version 2>/dev/null || echo 'openssl ?'); $(rustc --version). Edge (edgehub-bench: agent library" \
    "plus bench modules) and cloud (edgehub-cloudsim in load mode) are two processes on this host," \
    "TLS over loopback, ~130-byte JSON content, $secs s per scenario. Load average before the" \
    "runs: $load_before (other work on the host shares the cores; each scenario's is in the .jsonl)."
  echo
  "$bin/edgehub-bench" table "$results"
  echo
  echo "Stripped device binary (target/release/edgehub, opt-level z, LTO, OpenSSL dynamic):" \
    "$(stat -c %s "$work/edgehub-device") bytes ($(uname -m)); links $(ldd "$work/edgehub-device" | awk '{print $1}' | tr '\n' ' ')"
  armv7=dist/armv7-unknown-linux-musleabihf/edgehub
  if [ -f "$armv7" ]; then
    echo "armv7 (dist/armv7-unknown-linux-musleabihf/edgehub): $(stat -c %s "$armv7") bytes"
  else
    echo "armv7: no dist/armv7-unknown-linux-musleabihf/edgehub (build it with scripts/cross-build.sh)"
  fi
} >"$table"
cat "$table"
echo "bench: wrote $table, $results and $lines" >&2
