# Test stand-in for an OpenWrt SDK's include/package.mk. BuildPackage turns a package's
# definitions into three targets: `compile` runs Build/Compile, `install` runs
# Package/<name>/install into $(DESTDIR), and `info` prints the metadata the real build reads
# (source, license, maintainer, the package section's fields), one "NAME=value" a line.
define BuildPackage
$(eval $(Package/$(1)))
.PHONY: compile install info
compile:
	$(Build/Compile)
install:
	$(call Package/$(1)/install,$(DESTDIR))
info:
	@echo 'PKG_SOURCE_PROTO=$(PKG_SOURCE_PROTO)'
	@echo 'PKG_SOURCE_URL=$(PKG_SOURCE_URL)'
	@echo 'PKG_SOURCE_VERSION=$(PKG_SOURCE_VERSION)'
	@echo 'PKG_MIRROR_HASH=$(PKG_MIRROR_HASH)'
	@echo 'PKG_LICENSE=$(PKG_LICENSE)'
	@echo 'PKG_LICENSE_FILES=$(PKG_LICENSE_FILES)'
	@echo 'PKG_MAINTAINER=$(PKG_MAINTAINER)'
	@echo 'PKG_BUILD_DEPENDS=$(PKG_BUILD_DEPENDS)'
	@echo 'DEPENDS=$(DEPENDS)'
	@echo 'USERID=$(USERID)'
	@echo 'SECTION=$(SECTION)'
	@echo 'CATEGORY=$(CATEGORY)'
	@echo 'CONFFILES=$(strip $(Package/$(1)/conffiles))'
endef
