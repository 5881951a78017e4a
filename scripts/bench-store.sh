#!/usr/bin/env bash
# Measures the meta store (issue 3's figures): the durable ACK rate (messages stored, fsynced and
# ACKed per second) and the cloud-send-to-ACK latency p50/p99, first with the simulator pushing
# without waiting for ACKs (no in-flight limit), then in CloudHub's mode (one ack-queue message in
# flight per node). Release build; the agent (meta module only) and the simulator run in one
# process, over real mutual TLS on 127.0.0.1. Each message is an insert of a distinct ~600-byte
# ConfigMap. Times come from the simulator: its write of a message to the arrival of the ACK.
# Usage: scripts/bench-store.sh [MESSAGES]   (default 5000; the store is written under $TMPDIR,
# default /tmp: point it at the file system you want to measure)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export EDGEHUB_BENCH_MESSAGES=${1:-5000}
cargo test --release --quiet --features cloudsim --test meta_store -- \
  --ignored --nocapture --test-threads=1 bench_durable_ack_rate 2>&1 |
  grep -E '^(store under|fast mode|CloudHub mode)|panicked|FAILED'
