#!/usr/bin/env bash
# Measures the footprint figures issue notes report: stripped release binary size, and for
# `edgehub run` connected to the simulator with default timing (heartbeat 15 s): VmRSS and VmHWM
# after IDLE_SECS (default 60), thread count, and CPU seconds used while idle. With MEASURE_MQTT=1
# the agent also runs the EventBus connected to a mosquitto broker the script starts (issue 13).
# Usage: [MEASURE_MQTT=1] scripts/measure-idle.sh [IDLE_SECS]
set -euo pipefail
cd "$(dirname "$0")/.."
idle=${1:-60}
bash scripts/setup.sh
cargo build --release --quiet --bin edgehub
cp target/release/edgehub /tmp/edgehub-device-build
size_device=$(stat -c %s target/release/edgehub)
cargo build --release --quiet --features cloudsim --bins
bin=target/release
work=$(mktemp -d /tmp/edgehub-measure.XXXXXX)
sim_pid="" agent_pid="" mosq_pid=""
trap 'kill $agent_pid $sim_pid $mosq_pid 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
event_bus=""
if [ "${MEASURE_MQTT:-0}" = 1 ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  printf 'user root\nlistener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" >"$work/mosquitto.conf"
  "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$work/mosquitto.conf" 2>"$work/mosquitto.log" &
  mosq_pid=$!
  event_bus=", \"eventBus\": {\"mqttServerExternal\": \"tcp://127.0.0.1:$port\"}"
fi
"$bin/edgehub-cloudsim" gen-certs --dir "$work/pki" --node measure-gw >/dev/null
"$bin/edgehub-cloudsim" --listen 127.0.0.1:0 --ca "$work/pki/ca.crt" --cert "$work/pki/server.crt" \
  --key "$work/pki/server.key" </dev/null >"$work/sim.events" 2>"$work/sim.log" &
sim_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/sim.log" 2>/dev/null && break; sleep 0.1; done
addr=$(grep -o 'listening on [0-9.:]*' "$work/sim.log" | awk '{print $3}')
cat >"$work/config.json" <<JSON
{"nodeName": "measure-gw", "websocket": {"server": "$addr"}, "stateDir": "state", "localApiSocket": "api.sock",
 "tlsCaFile": "pki/ca.crt", "tlsCertFile": "pki/client.crt", "tlsPrivateKeyFile": "pki/client.key"$event_bus}
JSON
/tmp/edgehub-device-build run --config "$work/config.json" 2>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 100); do grep -q '"event":"connected"' "$work/sim.events" && break; sleep 0.1; done
grep -q '"event":"connected"' "$work/sim.events" || { echo "agent did not connect"; cat "$work/agent.log"; exit 1; }
cpu() { awk '{print $14 + $15}' "/proc/$agent_pid/stat"; }
cpu0=$(cpu)
sleep "$idle"
cpu1=$(cpu)
ticks=$(getconf CLK_TCK)
echo "stripped device binary (target/release/edgehub, no simulator): $size_device bytes"
grep -E '^(VmRSS|VmHWM|Threads)' "/proc/$agent_pid/status" | sed "s/^/after ${idle} s connected: /"
echo "threads: $(for t in /proc/$agent_pid/task/*; do cat "$t/comm"; done | sort | tr '\n' ' ')"
echo "cpu while idle: $(awk -v a="$cpu0" -v b="$cpu1" -v t="$ticks" 'BEGIN{printf "%.2f s", (b-a)/t}') over ${idle} s"
echo "keepalives seen by the cloud: $(grep -c '"operation":"keepalive"' "$work/sim.events")"
echo "dynamic libraries: $(ldd /tmp/edgehub-device-build | awk '{print $1}' | tr '\n' ' ')"
