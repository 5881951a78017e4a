#!/usr/bin/env bash
# Runs the whole test suite (unit, integration, CLI, init scripts) built for TARGET under
# qemu-user: cargo runs each test binary through CARGO_TARGET_<TRIPLE>_RUNNER, and binfmt_misc
# hands the target binaries that tests spawn (edgehub itself) to the same qemu. Installs what it
# needs with apt on first use; artefacts stay in target/cross, so a second run only re-runs.
# CI runs it for armv7-unknown-linux-musleabihf, the OpenWrt/gateway build.
#
#   scripts/cross-test.sh armv7-unknown-linux-musleabihf [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cross/env.sh
. cross/env.sh

[ $# -ge 1 ] || cross_die "usage: scripts/cross-test.sh TARGET [cargo test arguments]"
target="$1"
shift
cross_target_facts "$target"
cross_apt "$target"
cross_cargo_env
cross_binfmt

# The simulator for the integration tests, plus what makes OpenSSL part of a musl binary.
# (Not --all-features: that would also build OpenSSL from source for the glibc targets, which
# link the system's libssl like the shipped binary does.)
features=cloudsim
extra="$(cross_openssl_features)"
[ -z "$extra" ] || features="$features,$extra"
# Tests that cannot work under emulation read this and say so (tests/init_scripts.rs).
export EDGEHUB_CROSS_TARGET="$target"
# No debug info: faster links, smaller binaries; panics still name file and line. OpenSSL is
# optimised even in this debug build, or every TLS handshake crawls under qemu.
export CARGO_PROFILE_DEV_DEBUG=0

cross_log "testing $target under ${T_QEMU:-the host (no emulation needed)}"
start=$(date +%s)
"$CROSS_CARGO" test --target "$target" -Zbuild-std --features "$features" \
  --config 'profile.dev.package.openssl-sys.opt-level=2' "$@"
cross_log "$target: tests passed in $(($(date +%s) - start)) s"
