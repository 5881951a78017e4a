#!/usr/bin/env bash
# Soak: agent + CloudHub simulator + a proxy that cuts the link or leaves it half-open at random
# (every 5-30 s), steady traffic both ways (~200 msg/s up, 10 msg/s of ACKed updates down).
# Prints a line a minute and a summary: sent, received, lost (must be 0), re-sent, reconnects,
# VmRSS at start and end. Usage: scripts/soak.sh MINUTES
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:?usage: scripts/soak.sh MINUTES}
bash scripts/setup.sh
SOAK_MINUTES=$minutes cargo test --release --features cloudsim --test soak -- --ignored --nocapture 2>&1 \
  | grep -E '^soak|test result|panicked'
