#!/usr/bin/env bash
# The demo, and the README's main command. Builds edgehub and the CloudHub simulator, makes a
# throwaway CA, runs the agent against the simulator on 127.0.0.1 and narrates what happens: a
# join with a KubeEdge token, connect, keepalives, a ConfigMap pushed and ACKed once stored, the
# node registered and Ready (the Node object as the cloud holds it), a forced disconnect and the
# reconnect, a certificate rotation, a device over MQTT (mosquitto and a shell mapper: a report
# reaches the cloud, a desired value reaches the mapper as a delta). Exits 0 by itself
# (non-zero if a step does not happen).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "building (release, with the simulator)..."
cargo build --release --features cloudsim --bins --quiet
bin=target/release
node=demo-gw

work=$(mktemp -d /tmp/edgehub-demo.XXXXXX)
sim_pid="" agent_pid="" broker_pid="" mapper_pid=""
cleanup() {
  exec 3>&- 2>/dev/null || true
  [ -z "$mapper_pid" ] || kill "$mapper_pid" 2>/dev/null || true
  [ -z "$broker_pid" ] || kill "$broker_pid" 2>/dev/null || true
  [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null || true
  [ -n "$sim_pid" ] && kill "$sim_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
# wait_for FILE PATTERN [COUNT] [SECONDS]: until FILE has COUNT lines matching PATTERN.
wait_for() {
  local file=$1 pattern=$2 count=${3:-1} secs=${4:-20} waited=0
  until [ "$(grep -c -- "$pattern" "$file" 2>/dev/null || true)" -ge "$count" ]; do
    sleep 0.1
    waited=$((waited + 1))
    if [ "$waited" -ge $((secs * 10)) ]; then
      echo "demo: timed out waiting for '$pattern' in $file" >&2
      echo "--- agent log ---" >&2; cat "$work/agent.log" >&2 || true
      echo "--- simulator log ---" >&2; cat "$work/sim.log" >&2 || true
      exit 1
    fi
  done
}
# show FILE PATTERN: the last matching line, shortened for the screen.
show() { { grep -- "$2" "$1" || true; } | tail -n 1 | cut -c1-220 | sed 's/^/   /'; }

say "0. a throwaway cloud CA and server certificate (the edge gets its own by joining)"
"$bin/edgehub-cloudsim" gen-certs --dir "$work/pki" --node "$node" >/dev/null
ls "$work/pki" | sed 's/^/   /'

mkfifo "$work/sim.in"
"$bin/edgehub-cloudsim" --listen 127.0.0.1:0 --ca "$work/pki/ca.crt" \
  --cert "$work/pki/server.crt" --key "$work/pki/server.key" \
  --https-listen 127.0.0.1:0 --ca-key "$work/pki/ca.key" --cert-lifetime 30 \
  <"$work/sim.in" >"$work/sim.events" 2>"$work/sim.log" &
sim_pid=$!
exec 3>"$work/sim.in" # keep the simulator's stdin open; commands go here
wait_for "$work/sim.log" "listening on"
addr=$(grep -o 'listening on [0-9.:]*' "$work/sim.log" | head -n 1 | awk '{print $3}')
wait_for "$work/sim.events" '"event":"token"'
https=$(grep -o 'certificate server on [^ ]*' "$work/sim.log" | head -n 1 | awk '{print $4}')
grep -o '"token":"[^"]*"' "$work/sim.events" | head -n 1 | cut -d'"' -f4 >"$work/token"
echo "   simulated CloudHub on $addr, its certificate server on $https"
echo "   join token (keadm gettoken's format, <sha256 of CA>.<jwt>): $(cut -c1-24 "$work/token")..."

cat >"$work/config.json" <<JSON
{
  "nodeName": "$node",
  "heartbeat": 2,
  "websocket": {"server": "$addr", "readDeadline": 6},
  "httpServer": "$https",
  "tokenFile": "token",
  "tlsCaFile": "certs/ca.crt",
  "tlsCertFile": "certs/edge.crt",
  "tlsPrivateKeyFile": "certs/edge.key",
  "stateDir": "state",
  "localApiSocket": "api.sock",
  "nodeStatusUpdateFrequency": 10,
  "labels": {"site": "demo-lab"},
  "reconnectJitter": 0.5
}
JSON
say "1. edgehub run: no certificate yet, so it joins with the token, then connects (heartbeat 2 s)"
"$bin/edgehub" check-config --config "$work/config.json" >/dev/null
"$bin/edgehub" run --config "$work/config.json" 2>"$work/agent.log" &
agent_pid=$!
wait_for "$work/sim.events" '"event":"connected"'
wait_for "$work/agent.log" "connected to"
show "$work/agent.log" "matches the token"
show "$work/agent.log" "joined as"
show "$work/sim.events" '"event":"connected"'
show "$work/agent.log" "connected to"

say "2. keepalives: the first at once, then one every heartbeat"
wait_for "$work/sim.events" '"operation":"keepalive"' 2
grep -- '"operation":"keepalive"' "$work/sim.events" | head -n 2 | cut -c1-200 | sed 's/^/   /'

say "3. the cloud pushes a ConfigMap through its ACK queue; the agent stores it, then ACKs"
msg_id=$(cat /proc/sys/kernel/random/uuid)
echo "push $node {\"header\":{\"msg_id\":\"$msg_id\",\"timestamp\":$(date +%s)000,\"resourceversion\":\"42\"},\"route\":{\"source\":\"edgecontroller\",\"group\":\"resource\",\"operation\":\"insert\",\"resource\":\"default/configmap/app-cfg\"},\"content\":{\"metadata\":{\"name\":\"app-cfg\",\"namespace\":\"default\",\"resourceVersion\":\"42\"},\"data\":{\"LOG_LEVEL\":\"info\"}}}" >&3
wait_for "$work/sim.events" '"event":"ack"'
show "$work/sim.events" "\"parent_msg_id\":\"$msg_id\""
echo "   stored at $(cd "$work" && ls state/meta/default/configmap/app-cfg.json):"
sed 's/^/   /' "$work/state/meta/default/configmap/app-cfg.json"; echo

say "4. the node is registered and Ready: insert answered \"OK\", then a status update at once and every nodeStatusUpdateFrequency"
wait_for "$work/sim.events" '"action":"created"'
show "$work/sim.events" '"operation":"insert","resource":"default/nodestatus/'
show "$work/agent.log" "is registered with the cloud"
wait_for "$work/sim.events" '"action":"status"'
echo "   Ready condition the cloud holds:"
{ grep '"action":"status"' "$work/sim.events" || true; } | tail -n 1 \
  | grep -o '"conditions":\[[^]]*\]' | sed 's/^/   /'
echo "   the Node object as the cloud holds it:"
{ grep '"action":"status"' "$work/sim.events" || true; } | tail -n 1 | fold -w 150 | sed 's/^/   /'

say "5. the cloud drops the connection; the agent notices, waits 2 x heartbeat, reconnects"
echo "cut $node" >&3
wait_for "$work/sim.events" '"event":"disconnected"'
show "$work/sim.events" '"event":"disconnected"'
wait_for "$work/sim.events" '"event":"connected"' 2
wait_for "$work/agent.log" "connected to" 2
show "$work/agent.log" "reconnecting in"
show "$work/agent.log" "connected to"

say "6. the certificate is rotated at 70-90 % of its 30 s life: new key, over mutual TLS, then reconnect"
wait_for "$work/agent.log" "certificate rotated" 1 40
show "$work/agent.log" "rotation at"
show "$work/agent.log" "certificate rotated"
wait_for "$work/sim.events" '"event":"connected"' 3 20
grep '"event":"cert_request"' "$work/sim.events" | cut -c1-160 | sed 's/^/   /'

say "7. the Node object after the run so far (simulator command: node $node)"
echo "node $node" >&3
wait_for "$work/sim.events" '"action":"shown"'
{ grep '"action":"shown"' "$work/sim.events" || true; } | tail -n 1 | fold -w 150 | sed 's/^/   /'

say "8. a device: mosquitto, a shell mapper (mosquitto_pub/sub) and the agent's DeviceTwin"
port=$((20000 + RANDOM % 20000))
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$port" >"$work/mosquitto.conf"
/usr/sbin/mosquitto -c "$work/mosquitto.conf" 2>"$work/mosquitto.log" &
broker_pid=$!
echo "   mosquitto on 127.0.0.1:$port; the agent restarts with eventBus.mqttServerExternal set"
kill -TERM "$agent_pid"; wait "$agent_pid" 2>/dev/null || true
sed -i "s|\"reconnectJitter\": 0.5|\"reconnectJitter\": 0.5,\n  \"eventBus\": {\"mqttServerExternal\": \"tcp://127.0.0.1:$port\"}|" "$work/config.json"
"$bin/edgehub" run --config "$work/config.json" 2>>"$work/agent.log" &
agent_pid=$!
wait_for "$work/agent.log" "mqtt: connected to broker"
wait_for "$work/sim.events" '"event":"connected"' 4
# The mapper listens on every $hw/events topic; a membership/get answered proves both ends ready.
mosquitto_sub -h 127.0.0.1 -p "$port" -v -t '$hw/events/#' >"$work/mapper.out" &
mapper_pid=$!
for _ in $(seq 100); do
  mosquitto_pub -h 127.0.0.1 -p "$port" -t "\$hw/events/node/$node/membership/get" -m '{"event_id":"hello"}'
  grep -q 'membership/get/result' "$work/mapper.out" && break
  sleep 0.2
done
wait_for "$work/mapper.out" 'membership/get/result'
echo "   the cloud adds device thermo-1 to the node, desired temperature 25 (float)"
echo "push $node {\"header\":{\"msg_id\":\"$(cat /proc/sys/kernel/random/uuid)\",\"timestamp\":$(date +%s)000},\"route\":{\"source\":\"devicecontroller\",\"group\":\"twin\",\"operation\":\"update\",\"resource\":\"membership\"},\"content\":{\"event_id\":\"m1\",\"timestamp\":$(date +%s)000,\"added_devices\":[{\"id\":\"thermo-1\",\"name\":\"thermo-1\",\"twin\":{\"temperature\":{\"expected\":{\"value\":\"25\"},\"optional\":false,\"metadata\":{\"type\":\"float\"},\"expected_version\":{\"cloud\":4711,\"edge\":0}}}}],\"removed_devices\":null}}" >&3
wait_for "$work/mapper.out" 'membership/updated'
wait_for "$work/mapper.out" 'thermo-1/twin/update/delta'
show "$work/mapper.out" 'thermo-1/twin/update/delta'
echo "   the mapper reports 23.5; the agent stores it, answers, and the cloud receives edge_updated"
mosquitto_pub -h 127.0.0.1 -p "$port" -t '$hw/events/device/thermo-1/twin/update' \
  -m '{"event_id":"r1","timestamp":0,"twin":{"temperature":{"actual":{"value":"23.5"},"metadata":{"type":"float"}}}}'
wait_for "$work/mapper.out" 'thermo-1/twin/update/result'
show "$work/mapper.out" 'thermo-1/twin/update/result'
wait_for "$work/sim.events" 'twin/edge_updated'
echo "   cloud: $(grep 'twin/edge_updated' "$work/sim.events" | tail -n 1 | grep -o '"resource":"[^"]*".*' | cut -c1-230)"
echo "   the cloud sets desired 26; the mapper prints the delta"
echo "push $node {\"header\":{\"msg_id\":\"$(cat /proc/sys/kernel/random/uuid)\",\"timestamp\":$(date +%s)000},\"route\":{\"source\":\"devicecontroller\",\"group\":\"twin\",\"operation\":\"update\",\"resource\":\"device/thermo-1/twin/cloud_updated\"},\"content\":{\"event_id\":\"c1\",\"timestamp\":$(date +%s)000,\"twin\":{\"temperature\":{\"expected\":{\"value\":\"26\"},\"optional\":false,\"metadata\":{\"type\":\"float\"},\"expected_version\":{\"cloud\":4790,\"edge\":0}}}}}" >&3
wait_for "$work/mapper.out" '"delta":{"temperature":"26"}'
echo "   mapper: $(grep '"delta":{"temperature":"26"}' "$work/mapper.out" | tail -n 1 | grep -o '"delta":{[^}]*}')"

say "9. stop"
kill -TERM "$agent_pid"; wait "$agent_pid" 2>/dev/null || true; agent_pid=""
echo "   keepalives seen by the cloud: $(grep -c '"operation":"keepalive"' "$work/sim.events")"
echo "   sessions: $(grep -c '"event":"connected"' "$work/sim.events"), ACKs: $(grep -c '"event":"ack"' "$work/sim.events")"
echo
echo "demo finished: every step happened"
