# shellcheck shell=sh
# Test stand-in for OpenWrt's /lib/functions/procd.sh: the procd_* functions an init script calls
# build the message that `ubus call service set` would send to procd, in jshn's "procd" namespace
# as upstream does, and procd_close_service appends it as one line "METHOD JSON" to
# $PROCD_MESSAGES. The test plays procd: it reads the line and starts, keeps, restarts or stops
# the instance. Jail details are collected and written when the instance closes (upstream writes
# them in place; the JSON object is the same). Mount triggers name the paths given, as if each
# were a mount point (upstream looks them up in /etc/config/fstab).

_procd_old_ns=''
_procd_ns() {
	json_set_namespace procd _procd_old_ns
}

_procd_ns_back() {
	json_set_namespace "$_procd_old_ns"
}

procd_open_service() {
	_procd_ns
	json_init
	json_add_string name "$1"
	[ -z "$2" ] || json_add_string script "$2"
	json_add_object instances
	_procd_seq=0
	_procd_triggers=''
	_procd_ns_back
}

procd_open_instance() {
	_procd_ns
	_procd_seq=$((_procd_seq + 1))
	json_add_object "${1:-instance$_procd_seq}"
	_procd_jail='' _procd_mounts=''
	_procd_ns_back
}

procd_set_param() {
	_procd_ns
	_procd_type="$1"
	shift
	case "$_procd_type" in
	command | file | respawn | netdev | watch)
		json_add_array "$_procd_type"
		for _procd_arg in "$@"; do json_add_string "" "$_procd_arg"; done
		json_close_array
		;;
	env | data | limits)
		json_add_object "$_procd_type"
		for _procd_arg in "$@"; do json_add_string "${_procd_arg%%=*}" "${_procd_arg#*=}"; done
		json_close_object
		;;
	nice | term_timeout) json_add_int "$_procd_type" "$1" ;;
	stdout | stderr | no_new_privs) json_add_boolean "$_procd_type" "$1" ;;
	*) json_add_string "$_procd_type" "$1" ;;
	esac
	_procd_ns_back
}

procd_add_jail() {
	_procd_jail="$*"
}

procd_add_jail_mount() {
	for _procd_arg in "$@"; do _procd_mounts="$_procd_mounts 0:$_procd_arg"; done
}

procd_add_jail_mount_rw() {
	for _procd_arg in "$@"; do _procd_mounts="$_procd_mounts 1:$_procd_arg"; done
}

procd_close_instance() {
	_procd_ns
	if [ -n "$_procd_jail" ]; then
		json_add_object jail
		# shellcheck disable=SC2086 # name and flags, one word each
		set -- $_procd_jail
		json_add_string name "$1"
		shift
		for _procd_arg in "$@"; do json_add_boolean "$_procd_arg" 1; done
		json_add_object mount
		for _procd_arg in $_procd_mounts; do
			json_add_string "${_procd_arg#?:}" "${_procd_arg%%:*}"
		done
		json_close_object
		json_close_object
	fi
	json_close_object
	_procd_ns_back
}

procd_add_reload_trigger() {
	for _procd_arg in "$@"; do
		_procd_triggers="$_procd_triggers config.change:$_procd_arg"
	done
}

procd_add_restart_mount_trigger() {
	for _procd_arg in "$@"; do
		_procd_triggers="$_procd_triggers mount.add:$_procd_arg"
	done
}

procd_close_service() {
	_procd_ns
	json_close_object
	json_add_array triggers
	for _procd_arg in $_procd_triggers; do
		json_add_array ""
		json_add_string "" "${_procd_arg%%:*}"
		json_add_string "" "${_procd_arg#*:}"
		json_close_array
	done
	json_close_array
	printf '%s %s' "${1:-set}" "$(json_dump)" >>"$PROCD_MESSAGES"
	echo >>"$PROCD_MESSAGES"
	_procd_ns_back
}
