#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, formatting, lints, then every test (unit,
# integration over real TLS on 127.0.0.1, CLI). The simulator feature is on so the integration
# tests can start a CloudHub in-process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-features --all-targets -- -D warnings
cargo test --all-features
