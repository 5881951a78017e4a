# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables set here are read by the scripts that source this file
# Sourced by scripts/cross-build.sh and scripts/cross-test.sh: everything a cross build needs on a
# Debian 12 machine that reaches only Debian's archive and crates.io. It owns the apt work (host
# packages first, then foreign architectures: see cross_apt), the per-target facts (linker,
# OpenSSL, unwinder, qemu), and the cargo environment. It builds nothing of edgehub itself.
#
# The toolchain is Debian's own Rust (rustc-web, cargo-web, rust-web-src): rustup cannot download
# foreign standard libraries here, so std is built from source with -Zbuild-std, which that stable
# compiler accepts under RUSTC_BOOTSTRAP=1. Everything lands in target/cross so that the host's
# target/ (rustup's compiler) is neither rebuilt nor locked while a cross build runs.

CROSS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CROSS_TARGET_DIR="$CROSS_ROOT/target/cross"
# Shipped targets: what scripts/cross-build.sh builds when given none.
CROSS_DEFAULT_TARGETS=(
  armv7-unknown-linux-gnueabihf
  aarch64-unknown-linux-gnu
  armv7-unknown-linux-musleabihf
  aarch64-unknown-linux-musl
  x86_64-unknown-linux-musl
)
# Built only when asked for by name (see cross/README.md for why).
CROSS_EXPERIMENTAL_TARGETS=(mipsel-unknown-linux-musl)

cross_log() { printf 'cross: %s\n' "$*" >&2; }
cross_die() {
  printf 'cross: error: %s\n' "$*" >&2
  exit 1
}

# Sets the T_* facts for one target triple, or fails naming the supported ones.
#   T_LIBC      gnu | musl
#   T_DEB_ARCH  Debian architecture of the target's libraries (armhf, arm64, amd64, mipsel)
#   T_GNU       GNU triple of the Debian cross toolchain (arm-linux-gnueabihf, ...)
#   T_CC        C compiler / linker driver for the target
#   T_QEMU      qemu-user binary running it, empty when the host runs it natively
#   T_BINFMT    binfmt_misc entry name registering that qemu for child processes
#   T_HOST_PKGS / T_FOREIGN_PKGS   Debian packages (foreign ones carry :arch)
cross_target_facts() {
  local target="$1"
  T_TARGET="$target"
  T_QEMU=""
  T_BINFMT=""
  T_EXPERIMENTAL=0
  case "$target" in
    armv7-unknown-linux-gnueabihf)
      T_LIBC=gnu T_DEB_ARCH=armhf T_GNU=arm-linux-gnueabihf T_CC=arm-linux-gnueabihf-gcc
      T_QEMU=qemu-arm-static T_BINFMT=qemu-arm
      T_HOST_PKGS=(gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
      T_FOREIGN_PKGS=()
      ;;
    aarch64-unknown-linux-gnu)
      T_LIBC=gnu T_DEB_ARCH=arm64 T_GNU=aarch64-linux-gnu T_CC=aarch64-linux-gnu-gcc
      T_QEMU=qemu-aarch64-static T_BINFMT=qemu-aarch64
      T_HOST_PKGS=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
      T_FOREIGN_PKGS=()
      ;;
    armv7-unknown-linux-musleabihf)
      T_LIBC=musl T_DEB_ARCH=armhf T_GNU=arm-linux-gnueabihf T_CC=arm-linux-musleabihf-gcc
      T_QEMU=qemu-arm-static T_BINFMT=qemu-arm
      T_HOST_PKGS=(gcc-arm-linux-gnueabihf)
      T_FOREIGN_PKGS=(musl-dev:armhf)
      ;;
    aarch64-unknown-linux-musl)
      T_LIBC=musl T_DEB_ARCH=arm64 T_GNU=aarch64-linux-gnu T_CC=aarch64-linux-musl-gcc
      T_QEMU=qemu-aarch64-static T_BINFMT=qemu-aarch64
      T_HOST_PKGS=(gcc-aarch64-linux-gnu)
      T_FOREIGN_PKGS=(musl-dev:arm64)
      ;;
    x86_64-unknown-linux-musl)
      T_LIBC=musl T_DEB_ARCH=amd64 T_GNU=x86_64-linux-gnu T_CC=x86_64-linux-musl-gcc
      T_HOST_PKGS=(musl-tools musl-dev)
      T_FOREIGN_PKGS=()
      ;;
    mipsel-unknown-linux-musl)
      T_LIBC=musl T_DEB_ARCH=mipsel T_GNU=mipsel-linux-gnu T_CC=mipsel-linux-musl-gcc
      T_QEMU=qemu-mipsel-static T_BINFMT=qemu-mipsel T_EXPERIMENTAL=1
      T_HOST_PKGS=(gcc-mipsel-linux-gnu)
      T_FOREIGN_PKGS=(musl-dev:mipsel)
      ;;
    *)
      cross_die "unknown target '$target'; supported: ${CROSS_DEFAULT_TARGETS[*]} ${CROSS_EXPERIMENTAL_TARGETS[*]}"
      ;;
  esac
  T_ENV="$(printf '%s' "$target" | tr 'a-z-' 'A-Z_')"
  T_DIR="$CROSS_TARGET_DIR/support/$target"
}

# Packages every cross build needs, whatever the target. perl and make build OpenSSL from source
# for the musl targets; busybox and shellcheck serve the init-script tests of the suite.
CROSS_COMMON_PKGS=(rustc-web cargo-web rust-web-src qemu-user-static xz-utils perl make
  busybox shellcheck)

cross_missing_pkgs() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || printf '%s\n' "$p"
  done
}

cross_as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Installs the host and foreign packages the given targets need, doing nothing when all are there.
# Order matters (issue 8): the archive's bookworm-security index for armhf is currently broken, so
# `apt-get update` fails while armhf is enabled, and a failed suite is dropped whole, taking
# rustc-web 1.96 (which lives in bookworm-security) with it. So: update and install the host
# packages while only the native architecture is enabled, then add the foreign architectures,
# tolerate that second update, and take the foreign packages (musl-dev is in main) from it.
cross_apt() {
  local host=("${CROSS_COMMON_PKGS[@]}") foreign=() archs=() ssl_targets=() t
  for t in "$@"; do
    cross_target_facts "$t"
    host+=("${T_HOST_PKGS[@]}")
    foreign+=("${T_FOREIGN_PKGS[@]}")
    if [ "$T_LIBC" = gnu ]; then
      # Headers and libssl.so to link against, downloaded and unpacked, not installed.
      archs+=("$T_DEB_ARCH")
      [ -e "$T_DIR/openssl/.done" ] || ssl_targets+=("$t")
    fi
  done
  for t in "${foreign[@]}"; do archs+=("${t##*:}"); done

  local missing_host missing_foreign missing_archs=() a native
  native="$(dpkg --print-architecture)"
  missing_host="$(cross_missing_pkgs "${host[@]}" | sort -u)"
  missing_foreign="$(cross_missing_pkgs "${foreign[@]}" | sort -u)"
  for a in $(printf '%s\n' "${archs[@]}" | sort -u); do
    [ "$a" = "$native" ] && continue
    dpkg --print-foreign-architectures | grep -qx "$a" || missing_archs+=("$a")
  done

  export DEBIAN_FRONTEND=noninteractive
  local apt_q=(-y -qq --no-install-recommends -o Dpkg::Use-Pty=0)
  if [ -n "$missing_host" ]; then
    cross_log "apt: installing host packages: ${missing_host//$'\n'/ }"
    # Index only the native architecture, so a broken foreign index cannot hide rustc-web.
    cross_as_root apt-get update -qq -o APT::Architectures="$native" ||
      cross_log "apt: update reported errors; trying the install anyway"
    # shellcheck disable=SC2086 # one package per word
    cross_as_root apt-get install "${apt_q[@]}" $missing_host >/dev/null ||
      cross_die "apt-get install failed for: $missing_host"
  fi
  if [ ${#missing_archs[@]} -eq 0 ] && [ -z "$missing_foreign" ] && [ ${#ssl_targets[@]} -eq 0 ]; then
    return 0
  fi
  for a in "${missing_archs[@]}"; do
    cross_log "apt: adding architecture $a"
    cross_as_root dpkg --add-architecture "$a"
  done
  cross_as_root apt-get update -qq 2>/dev/null ||
    cross_log "apt: update with foreign architectures reported errors (known: armhf security index); using main"
  if [ -n "$missing_foreign" ]; then
    cross_log "apt: installing foreign packages: ${missing_foreign//$'\n'/ }"
    # shellcheck disable=SC2086 # one package per word
    cross_as_root apt-get install "${apt_q[@]}" $missing_foreign >/dev/null ||
      cross_die "apt-get install failed for: $missing_foreign"
  fi
  for t in "${ssl_targets[@]}"; do
    cross_target_facts "$t"
    cross_log "apt: downloading libssl-dev:$T_DEB_ARCH for $t"
    rm -rf "$T_DIR/debs"
    mkdir -p "$T_DIR/debs"
    (cd "$T_DIR/debs" && apt-get download -qq "libssl-dev:$T_DEB_ARCH" "libssl3:$T_DEB_ARCH") ||
      cross_die "apt-get download libssl-dev:$T_DEB_ARCH failed"
  done
}

# glibc targets link Debian's libssl dynamically, as a Debian/Raspberry Pi OS gateway has it. The
# target's libssl-dev (downloaded by cross_apt) is unpacked into target/cross rather than
# installed: installing it would tie the host's libssl3 to the foreign archive's version
# (Multi-Arch: same), which the broken armhf security index makes impossible to satisfy.
cross_openssl_sysroot() {
  local sys="$T_DIR/openssl"
  if [ ! -e "$sys/.done" ]; then
    ls "$T_DIR"/debs/*.deb >/dev/null 2>&1 || cross_die "no libssl debs in $T_DIR/debs (cross_apt first)"
    rm -rf "$sys"
    mkdir -p "$sys"
    local deb
    for deb in "$T_DIR"/debs/*.deb; do dpkg-deb -x "$deb" "$sys"; done
    # Debian keeps opensslconf.h and configuration.h under the multiarch include dir; openssl-sys
    # takes one include dir, so fold them in.
    cp "$sys/usr/include/$T_GNU/openssl/"*.h "$sys/usr/include/openssl/"
    touch "$sys/.done"
  fi
  T_SSL_LIB="$sys/usr/lib/$T_GNU"
  export "${T_ENV}_OPENSSL_LIB_DIR=$T_SSL_LIB"
  export "${T_ENV}_OPENSSL_INCLUDE_DIR=$sys/usr/include"
}

# musl targets: Debian ships no unwinder for musl, but the cross gcc's libgcc_eh.a can serve as
# libunwind.a. On aarch64, x86_64 and mips it calls glibc's _dl_find_object, which musl lacks, so
# a replacement built on dl_iterate_phdr (cross/musl/dl_find_object.c) is added to the archive.
cross_musl_unwind() {
  local out="$T_DIR/unwind" eh shim="$CROSS_ROOT/cross/musl/dl_find_object.c" needs_shim=0
  eh="$("$T_GNU-gcc" -print-file-name=libgcc_eh.a)"
  [ -f "$eh" ] || cross_die "no libgcc_eh.a from $T_GNU-gcc"
  # (grep without -q: it must read all of nm's output, or pipefail sees nm die of SIGPIPE.)
  if "$T_GNU-nm" "$eh" 2>/dev/null | grep ' U _dl_find_object$' >/dev/null; then
    needs_shim=1
  fi
  if [ ! -f "$out/libunwind.a" ] || [ "$shim" -nt "$out/libunwind.a" ] || [ "$eh" -nt "$out/libunwind.a" ] ||
    { [ "$needs_shim" = 1 ] && ! "$T_GNU-nm" "$out/libunwind.a" 2>/dev/null | grep ' T _dl_find_object$' >/dev/null; }; then
    mkdir -p "$out"
    cp "$eh" "$out/libunwind.a.tmp"
    if [ "$needs_shim" = 1 ]; then
      "$T_CC" -O2 -fPIC -c "$shim" -o "$out/dl_find_object.o"
      "$T_GNU-ar" rs "$out/libunwind.a.tmp" "$out/dl_find_object.o" 2>/dev/null
    fi
    mv "$out/libunwind.a.tmp" "$out/libunwind.a"
  fi
  T_UNWIND_DIR="$out"
}

# Exports the cargo environment for one target: Debian's toolchain, linker, flags, OpenSSL, and
# the qemu runner. Call after cross_target_facts.
cross_cargo_env() {
  export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1
  export CARGO_TARGET_DIR="$CROSS_TARGET_DIR"
  CROSS_CARGO=/usr/bin/cargo
  # Flags from the caller's environment would override the per-target ones below.
  unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS RUSTDOCFLAGS CARGO_BUILD_TARGET

  local flags=()
  local cc_env="${T_TARGET//-/_}"
  export "CARGO_TARGET_${T_ENV}_LINKER=$T_CC"
  export "CC_${cc_env}=$T_CC"
  export "AR_${cc_env}=$T_GNU-ar"
  export "RANLIB_${cc_env}=$T_GNU-ranlib"
  if [ "$T_LIBC" = musl ]; then
    cross_musl_unwind
    # Static, non-PIE, linked against Debian's musl with the cross gcc's libgcc; Rust's own
    # self-contained crt objects are for its prebuilt std, which this toolchain does not have.
    local static=+crt-static
    if [ "$T_TARGET" = mipsel-unknown-linux-musl ]; then
      # Debian's musl is hard-float, Rust's mipsel-musl soft-float: without this, floats passed
      # to libc come out silently wrong. The binary then needs an FPU (or kernel FPU emulation).
      static=+crt-static,-soft-float
    fi
    flags=(-C "target-feature=$static" -C link-self-contained=no -C relocation-model=static
      -C link-arg=-lgcc -L "native=$T_UNWIND_DIR")
    # Debian's musl is 1.2 with a 64-bit time_t everywhere, and OpenSSL is compiled against its
    # headers. The libc crate defaults to musl 1.1's 32-bit time_t on 32-bit targets: OpenSSL
    # calls taking a time_t would then get garbage, and times would end in 2038. This makes std
    # and the libc crate use musl 1.2's ABI (the 64-bit symbols) instead: std's libc (0.2.183)
    # reads the environment variable, newer ones the cfg (and do not rerun on the variable).
    export RUST_LIBC_UNSTABLE_MUSL_V1_2_3=1
    flags+=(--cfg libc_unstable_musl_v1_2)
  else
    cross_openssl_sysroot
  fi
  export "CARGO_TARGET_${T_ENV}_RUSTFLAGS=${flags[*]}"
  export RUSTDOCFLAGS="${flags[*]}"

  if [ -n "$T_QEMU" ]; then
    local runner=("$T_QEMU")
    if [ "$T_LIBC" = gnu ]; then
      local libs="/usr/$T_GNU/lib:$T_SSL_LIB"
      # Without -E, a multiarch libc installed on the host is found first and the program spins.
      runner+=(-L "/usr/$T_GNU" -E "LD_LIBRARY_PATH=$libs")
      # The same for programs the tests spawn, which reach qemu through binfmt_misc.
      export QEMU_LD_PREFIX="/usr/$T_GNU" QEMU_SET_ENV="LD_LIBRARY_PATH=$libs"
    fi
    export "CARGO_TARGET_${T_ENV}_RUNNER=timeout -k 10 ${CROSS_TEST_TIMEOUT:-900} ${runner[*]}"
  fi
}

# Features that make OpenSSL part of a static musl binary: the openssl crate's `vendored`
# (openssl-src), enabled from here rather than as a feature of ours, so that the host suite's
# --all-features does not build OpenSSL from source. A `vendored-openssl` feature, if the crate
# ever gets one, is used instead.
cross_openssl_features() {
  if [ "$T_LIBC" != musl ]; then
    return 0
  fi
  if grep -q '^vendored-openssl *=' "$CROSS_ROOT/Cargo.toml"; then
    printf '%s' vendored-openssl
  else
    printf '%s' openssl/vendored
  fi
}

# Makes the kernel hand binaries of the target's architecture to qemu, so programs that the tests
# spawn (the edgehub binary, say) run too. Needs root; mounts binfmt_misc if nothing has.
cross_binfmt() {
  [ -n "$T_BINFMT" ] || return 0
  local fs=/proc/sys/fs/binfmt_misc
  [ -e "$fs/$T_BINFMT" ] && return 0
  if [ ! -e "$fs/register" ]; then
    cross_as_root mount -t binfmt_misc binfmt_misc "$fs" 2>/dev/null ||
      cross_die "cannot mount binfmt_misc at $fs; tests that spawn target binaries cannot run"
  fi
  [ -e "$fs/$T_BINFMT" ] && return 0
  local conf="/usr/lib/binfmt.d/$T_BINFMT.conf"
  [ -f "$conf" ] || cross_die "no $conf (package qemu-user-static)"
  cross_log "registering $T_BINFMT with binfmt_misc"
  # The F flag opens the interpreter now, so it also works inside other mount namespaces.
  cross_as_root sh -c "cat '$conf' > '$fs/register'" ||
    cross_die "cannot register $T_BINFMT with binfmt_misc"
}
