#!/usr/bin/env bash
# Installs what building and testing edgehub needs on a fresh Debian machine: a Rust toolchain is
# assumed (cargo on PATH); OpenSSL headers, pkg-config, busybox and shellcheck come from Debian's
# packages. Idempotent. (Cross toolchains: scripts/cross-test.sh --setup.)
set -euo pipefail

need_apt=()
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
if ! pkg-config --exists openssl 2>/dev/null; then need_apt+=(libssl-dev); fi
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# The init-script tests run the scripts under busybox and check them with shellcheck.
command -v busybox >/dev/null 2>&1 || need_apt+=(busybox)
command -v shellcheck >/dev/null 2>&1 || need_apt+=(shellcheck)
# The MQTT tests start their own mosquitto broker; the demo's shell mapper uses its clients.
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
# The systemd unit is checked with systemd-analyze.
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
# The OpenWrt package Makefile is run with make against stand-ins of the SDK's include files.
command -v make >/dev/null 2>&1 || need_apt+=(make)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  # Native architecture only: once armhf is enabled (scripts/cross-*.sh), its broken security
  # index would fail a plain update.
  $sudo apt-get update -qq -o APT::Architectures="$(dpkg --print-architecture)" || true
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (rustup or Debian's cargo) first" >&2
  exit 1
fi
