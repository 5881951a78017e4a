#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up (all apt work first), formatting, lints, every host
# test (unit, integration over real TLS on 127.0.0.1, CLI, init scripts), then the same suite built
# for armv7-unknown-linux-musleabihf (the OpenWrt/gateway build) and run under qemu-user.
# EDGEHUB_SKIP_CROSS=1 leaves the ARM run out (a quick local check; CI never sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
cross_target=armv7-unknown-linux-musleabihf
bash scripts/setup.sh
if [ "${EDGEHUB_SKIP_CROSS:-0}" != 1 ]; then
  bash scripts/cross-test.sh --setup "$cross_target"
fi
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo clippy --all-features --all-targets -- -D warnings
cargo test --all-features
if [ "${EDGEHUB_SKIP_CROSS:-0}" != 1 ]; then
  bash scripts/cross-test.sh "$cross_target"
fi
