# Test stand-in for the packages feed's lang/rust/rust-package.mk (with rust-values.mk): the
# interface a Rust package uses, with upstream's behaviour where it matters here. CARGO_PKG_VARS
# is a recursive variable whose cargo profile settings include PANIC=unwind and overflow checks,
# Build/Compile/Cargo runs `cargo install --locked` into PKG_INSTALL_DIR with those variables in
# front, RustBinPackage installs every binary unless the package has its own install.
RUST_ARCH_DEPENDS:=@(aarch64||arm||i386||i686||mips||mipsel||mips64||mips64el||powerpc64||riscv64||x86_64)
RUSTC_TARGET_ARCH:=mipsel-unknown-linux-musl
CARGO_PKG_CONFIG_VARS= \
	CARGO_BUILD_TARGET=$(RUSTC_TARGET_ARCH) \
	CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true \
	CARGO_PROFILE_RELEASE_PANIC=unwind
CARGO_PKG_VARS= \
	$(CARGO_PKG_CONFIG_VARS) \
	CC=cc
RUST_PKG_LOCKED ?= 1
CARGO_PKG_ARGS=$(if $(filter 1,$(RUST_PKG_LOCKED)),--locked)

define Build/Compile/Cargo
	$(CARGO_PKG_VARS) cargo install -v --profile release --root $(PKG_INSTALL_DIR) \
		--path "$(PKG_BUILD_DIR)/$(strip $(1))" $(CARGO_PKG_ARGS) $(2)
endef

define RustBinPackage
  ifndef Package/$(1)/install
    define Package/$(1)/install
	$$(INSTALL_DIR) $$(1)/usr/bin/
	$$(INSTALL_BIN) $$(PKG_INSTALL_DIR)/bin/* $$(1)/usr/bin/
    endef
  endif
endef

Build/Compile=$(call Build/Compile/Cargo)
