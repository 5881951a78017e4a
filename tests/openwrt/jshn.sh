# shellcheck shell=sh
# Test stand-in for the shell API of libubox's jshn.sh (/usr/share/libubox/jshn.sh), which Debian
# does not package. Written from its documented behaviour, not its code: json_init,
# json_set_namespace, json_cleanup, json_add_string/int/double/boolean, json_add_object/array,
# json_close_object/array and json_dump, with the value conversions of the jshn program (json-c):
# an int is what atoll(3) reads (015 -> 15, .5 -> 0), a double what strtod(3) reads printed with
# %.17g (".0" added when integral), a boolean is atoi(3) != 0, strings are escaped as json-c does
# (\/ included), and the dump is spaced as json-c prints it. Not modelled: json_select and the
# read side (json_load, json_get_*), which the scripts under test do not use.

_jsa_get() { eval "$1=\${${JSON_PREFIX}JSA_$2-}"; }
_jsa_put() { eval "${JSON_PREFIX}JSA_$1=\$2"; }

# The body of a JSON string for $1, as json-c writes it.
_jsa_escape() {
	printf '%s.' "$1" | awk '
		BEGIN {
			for (i = 1; i < 32; i++) ctl[sprintf("%c", i)] = sprintf("\\u%04x", i)
			ctl[sprintf("%c", 8)] = "\\b"; ctl[sprintf("%c", 9)] = "\\t"
			ctl[sprintf("%c", 12)] = "\\f"; ctl[sprintf("%c", 13)] = "\\r"
		}
		function esc(s,    out, i, c) {
			out = ""
			for (i = 1; i <= length(s); i++) {
				c = substr(s, i, 1)
				if (c == "\\") out = out "\\\\"
				else if (c == "\"") out = out "\\\""
				else if (c == "/") out = out "\\/"
				else if (c in ctl) out = out ctl[c]
				else out = out c
			}
			return out
		}
		{ if (NR > 1) printf "%s\\n", esc(prev); prev = $0 }
		END { printf "%s", esc(substr(prev, 1, length(prev) - 1)) }'
}

# atoll(3): leading blanks, a sign, digits; 0 when there are none.
_jsa_atoll() {
	printf '%s\n' "$1" | awk 'NR == 1 {
		s = "0"
		if (match($0, /^[ \t]*[-+]?[0-9]+/)) {
			s = substr($0, RSTART, RLENGTH); gsub(/[ \t+]/, "", s)
			neg = (s ~ /^-/); sub(/^-/, "", s); sub(/^0+/, "", s)
			if (s == "") s = "0"
			if (neg && s != "0") s = "-" s
		}
		printf "%s", s
	}'
}

# Appends one member (or array element) with the already formatted value $2.
_jsa_member() {
	_jsa_doc='' _jsa_first='' _jsa_stack=''
	_jsa_get _jsa_doc DOC
	_jsa_get _jsa_first FIRST
	_jsa_get _jsa_stack STACK
	if [ "$_jsa_first" = 1 ]; then _jsa_doc="$_jsa_doc "; else _jsa_doc="$_jsa_doc, "; fi
	case "$_jsa_stack" in
	*a) ;;
	*) _jsa_doc="$_jsa_doc\"$(_jsa_escape "$1")\": " ;;
	esac
	_jsa_put DOC "$_jsa_doc$2"
	_jsa_put FIRST 0
}

json_set_namespace() {
	[ -z "$2" ] || eval "$2=\${JSON_PREFIX-}"
	JSON_PREFIX="$1"
}

json_cleanup() {
	unset "${JSON_PREFIX}JSA_DOC" "${JSON_PREFIX}JSA_FIRST" "${JSON_PREFIX}JSA_STACK"
}

json_init() {
	json_cleanup
	_jsa_put DOC "{"
	_jsa_put FIRST 1
	_jsa_put STACK ""
}

json_add_string() { _jsa_member "$1" "\"$(_jsa_escape "$2")\""; }
json_add_int() { _jsa_member "$1" "$(_jsa_atoll "$2")"; }
json_add_boolean() {
	if [ "$(_jsa_atoll "$2")" = 0 ]; then _jsa_member "$1" false; else _jsa_member "$1" true; fi
}
json_add_double() {
	_jsa_member "$1" "$(awk -v v="$2" 'BEGIN {
		s = sprintf("%.17g", v + 0); if (s !~ /[.e]/) s = s ".0"; printf "%s", s }')"
}

_jsa_open() {
	_jsa_member "$1" "$2"
	_jsa_get _jsa_stack STACK
	_jsa_put STACK "$_jsa_stack$3"
	_jsa_put FIRST 1
}

_jsa_close() {
	_jsa_get _jsa_doc DOC
	_jsa_get _jsa_stack STACK
	_jsa_put DOC "$_jsa_doc $1"
	_jsa_put STACK "${_jsa_stack%?}"
	_jsa_put FIRST 0
}

json_add_object() { _jsa_open "$1" "{" o; }
json_close_object() { _jsa_close "}"; }
json_add_array() { _jsa_open "$1" "[" a; }
json_close_array() { _jsa_close "]"; }

# The document, with the root object closed (objects or arrays left open are closed too, as
# jshn's dump of its variables would show them).
json_dump() {
	_jsa_get _jsa_doc DOC
	_jsa_get _jsa_stack STACK
	while [ -n "$_jsa_stack" ]; do
		case "$_jsa_stack" in
		*a) _jsa_doc="$_jsa_doc ]" ;;
		*) _jsa_doc="$_jsa_doc }" ;;
		esac
		_jsa_stack="${_jsa_stack%?}"
	done
	printf '%s }\n' "$_jsa_doc"
}
