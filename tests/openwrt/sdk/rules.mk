# Test stand-in for an OpenWrt SDK's rules.mk: the directories and install commands a package
# Makefile uses, with the same names and modes as upstream (INSTALL_CONF is 0600).
INCLUDE_DIR:=$(TOPDIR)/include
STAGING_DIR:=$(TOPDIR)/staging_dir/target-test
PKG_BUILD_DIR=$(TOPDIR)/build_dir/$(PKG_NAME)-$(PKG_VERSION)
PKG_INSTALL_DIR=$(PKG_BUILD_DIR)/ipkg-install
INSTALL_DIR:=install -d -m0755
INSTALL_BIN:=install -m0755
INSTALL_DATA:=install -m0644
INSTALL_CONF:=install -m0600
