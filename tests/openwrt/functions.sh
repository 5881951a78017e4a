# shellcheck shell=sh
# Test stand-in for the UCI part of OpenWrt's /lib/functions.sh. The real config_load runs
# `uci export PACKAGE` and evaluates its output, lines of `config TYPE NAME`, `option NAME VALUE`
# and `list NAME VALUE`, with the functions below; here the UCI file itself
# ($UCI_CONFIG_DIR/PACKAGE, written in the same syntax) is evaluated. Values end up in
# CONFIG_<section>_<option>; a list's items also in _ITEM<n> with _LENGTH, and joined by spaces
# in the option's own variable, as upstream does. config_get, config_get_bool and
# config_list_foreach read them with upstream's semantics (an empty value takes the default).

config() {
	_uci_section="$2"
	eval "CONFIG_${_uci_section}_TYPE=\$1"
}

option() {
	eval "CONFIG_${_uci_section}_$1=\$2"
}

list() {
	_uci_n=0
	eval "_uci_n=\$((\${CONFIG_${_uci_section}_$1_LENGTH:-0} + 1))"
	eval "CONFIG_${_uci_section}_$1_ITEM$_uci_n=\$2"
	eval "CONFIG_${_uci_section}_$1_LENGTH=\$_uci_n"
	eval "CONFIG_${_uci_section}_$1=\"\${CONFIG_${_uci_section}_$1:+\${CONFIG_${_uci_section}_$1} }\$2\""
}

config_load() {
	# Forget a previous load (its variables), as the real one does.
	for _uci_var in $(set | sed -n 's/^\(CONFIG_[A-Za-z0-9_]*\)=.*/\1/p'); do
		unset "$_uci_var"
	done
	[ -r "$UCI_CONFIG_DIR/$1" ] || return 1
	# shellcheck disable=SC1090 # the test's UCI file
	. "$UCI_CONFIG_DIR/$1"
}

config_get() {
	eval "$1=\${CONFIG_$2_$3:-\$4}"
}

config_get_bool() {
	config_get "$@"
	eval "_uci_value=\$$1"
	case "$_uci_value" in
	1 | on | true | yes | enabled) _uci_value=1 ;;
	0 | off | false | no | disabled) _uci_value=0 ;;
	*) _uci_value="$4" ;;
	esac
	eval "$1=\$_uci_value"
}

config_list_foreach() {
	_uci_i=0 _uci_len=0 _uci_item=''
	eval "_uci_len=\${CONFIG_$1_$2_LENGTH:-0}"
	_uci_function="$3"
	_uci_s="$1" _uci_o="$2"
	shift 3
	while [ "$_uci_i" -lt "$_uci_len" ]; do
		_uci_i=$((_uci_i + 1))
		eval "_uci_item=\$CONFIG_${_uci_s}_${_uci_o}_ITEM$_uci_i"
		"$_uci_function" "$_uci_item" "$@"
	done
}
