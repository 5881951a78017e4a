#!/usr/bin/env bash
# Cross-builds the device binary (`edgehub`, release profile, stripped) for gateway targets into
# dist/<target>/edgehub and prints each one's size. With no argument it builds the shipped targets
# (cross/env.sh, CROSS_DEFAULT_TARGETS); mipsel-unknown-linux-musl is built only when named.
# Installs what it needs with apt on first use; a second run only re-checks and is quick, since
# the std built from source and every dependency stay in target/cross.
#
#   scripts/cross-build.sh                                  # all shipped targets
#   scripts/cross-build.sh armv7-unknown-linux-musleabihf   # one
#   scripts/cross-build.sh --setup [TARGET...]              # only the apt work
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cross/env.sh
. cross/env.sh

setup_only=0
if [ "${1:-}" = --setup ]; then
  setup_only=1
  shift
fi
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${CROSS_DEFAULT_TARGETS[@]}")
for t in "${targets[@]}"; do cross_target_facts "$t"; done # unknown names fail before any work
cross_apt "${targets[@]}"
if [ "$setup_only" = 1 ]; then
  cross_log "packages for ${targets[*]} installed; nothing built"
  exit 0
fi

build_one() (
  cross_target_facts "$1"
  cross_cargo_env
  local features
  features="$(cross_openssl_features)"
  [ "$T_EXPERIMENTAL" = 0 ] || cross_log "$1 is experimental: see cross/README.md"
  cross_log "building $1"
  "$CROSS_CARGO" build --release --target "$1" --bin edgehub -Zbuild-std=std,panic_abort \
    ${features:+--features "$features"}
  mkdir -p "dist/$1"
  cp "$CARGO_TARGET_DIR/$1/release/edgehub" "dist/$1/edgehub.tmp"
  "$T_GNU-strip" "dist/$1/edgehub.tmp" # the profile strips already; this makes sure
  mv "dist/$1/edgehub.tmp" "dist/$1/edgehub"
  if [ ! -f "dist/$1/edgehub.xz" ] || [ "dist/$1/edgehub" -nt "dist/$1/edgehub.xz" ]; then
    xz -9 -c "dist/$1/edgehub" >"dist/$1/edgehub.xz"
  fi
)

for t in "${targets[@]}"; do build_one "$t"; done

# The size table: stripped binary, xz-compressed (what a firmware image or download carries), and
# what it needs at run time.
mb() { awk -v b="$1" 'BEGIN { printf "%.2f MB", b / 1048576 }'; }
printf '\n%-34s %10s %10s  %s\n' target stripped xz "needs at run time"
for t in "${targets[@]}"; do
  cross_target_facts "$t"
  bin="dist/$t/edgehub"
  needs="$("$T_GNU-readelf" -d "$bin" 2>/dev/null | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
  printf '%-34s %10s %10s  %s\n' "$t" "$(mb "$(stat -c %s "$bin")")" \
    "$(mb "$(stat -c %s "$bin.xz")")" "${needs:-nothing (static)}"
done
