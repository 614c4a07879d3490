#!/bin/sh
# install-request-helper.sh: make kmodd-request the kernel's request_module()
# helper (/proc/sys/kernel/modprobe), or undo it.  Reversible: the previous
# helper path is saved and restored.
#
#   install-request-helper.sh install [--kmodctl PATH] [--fallback auto|kmodctl|modprobe]
#   install-request-helper.sh uninstall
#   install-request-helper.sh status
#
# install   copies contrib/kmodd-request to $LIBEXEC/kmodd-request (with the
#           kmodctl path and fallback baked in), saves the current
#           kernel.modprobe value to $STATE/modprobe.orig, writes the
#           sysctl.d drop-in $SYSCTL_D/50-kmodd-request.conf (survives a
#           reboot) and sets /proc/sys/kernel/modprobe now.
# uninstall restores the saved value (default /sbin/modprobe) now, removes
#           the drop-in and the installed helper.
#
# --root DIR operates on a tree instead of / (tests, image builds): every
# path above, /proc included, is taken under DIR.
#
# This is for installs from a checkout or a virtual environment; with the
# Debian package, "kmodd-takeover enable" does the same for the package's
# /usr/libexec/kmodd/kmodd-request (and hands udev's driver job over too).
set -eu

ROOT=
KMODCTL=
FALLBACK=auto
action=

usage() {
	sed -n '2,20s/^# \{0,1\}//p' "$0" >&2
	exit 2
}

while [ $# -gt 0 ]; do
	case $1 in
	install|uninstall|status) action=$1 ;;
	--root) ROOT=${2:?--root needs a directory}; shift ;;
	--kmodctl) KMODCTL=${2:?--kmodctl needs a path}; shift ;;
	--fallback) FALLBACK=${2:?--fallback needs auto, kmodctl or modprobe}; shift ;;
	-h|--help) usage ;;
	*) echo "install-request-helper.sh: unknown argument $1" >&2; usage ;;
	esac
	shift
done
[ -n "$action" ] || usage
case $FALLBACK in auto|kmodctl|modprobe) ;; *) usage ;; esac

LIBEXEC=$ROOT/usr/local/libexec/kmodd
HELPER=/usr/local/libexec/kmodd/kmodd-request     # as the kernel sees it
STATE=$ROOT/var/lib/kmodd
SYSCTL_D=$ROOT/etc/sysctl.d
DROPIN=$SYSCTL_D/50-kmodd-request.conf
PROC_MODPROBE=$ROOT/proc/sys/kernel/modprobe
SOURCE=$(cd "$(dirname "$0")" && pwd)/kmodd-request

current() { cat "$PROC_MODPROBE" 2>/dev/null || echo "(unreadable)"; }

case $action in
status)
	echo "kernel.modprobe = $(current)"
	[ -f "$DROPIN" ] && echo "drop-in: $DROPIN" || echo "drop-in: none"
	[ -f "$STATE/modprobe.orig" ] && echo "saved: $(cat "$STATE/modprobe.orig")"
	[ -x "$LIBEXEC/kmodd-request" ] && echo "helper: $LIBEXEC/kmodd-request"
	exit 0
	;;
install)
	[ -f "$SOURCE" ] || { echo "cannot find $SOURCE" >&2; exit 1; }
	if [ -z "$KMODCTL" ]; then
		KMODCTL=$(command -v kmodctl 2>/dev/null || echo kmodctl)
	fi
	case $KMODCTL in
	*[!A-Za-z0-9_./+-]*) echo "unsafe kmodctl path: $KMODCTL" >&2; exit 1 ;;
	esac
	mkdir -p "$LIBEXEC" "$STATE" "$SYSCTL_D"
	tmp=$LIBEXEC/.kmodd-request.$$
	# Bake the defaults in: the kernel runs the helper with an empty
	# environment and PATH=/sbin:/usr/sbin:/bin:/usr/bin.
	sed -e "s|^: \"\${KMODD_KMODCTL:=kmodctl}\"|: \"\${KMODD_KMODCTL:=$KMODCTL}\"|" \
	    -e "s|^: \"\${KMODD_FALLBACK:=auto}\"|: \"\${KMODD_FALLBACK:=$FALLBACK}\"|" \
	    "$SOURCE" >"$tmp"
	chmod 0755 "$tmp"
	mv -f "$tmp" "$LIBEXEC/kmodd-request"
	old=$(current)
	# Keep the first saved value across repeated installs.
	if [ ! -f "$STATE/modprobe.orig" ] && [ "$old" != "$HELPER" ]; then
		printf '%s\n' "$old" >"$STATE/modprobe.orig"
	fi
	printf '# Installed by kmodd install-request-helper.sh; remove with "uninstall".\nkernel.modprobe = %s\n' \
		"$HELPER" >"$DROPIN"
	printf '%s\n' "$HELPER" >"$PROC_MODPROBE"
	echo "kernel.modprobe = $(current) (was $old)"
	;;
uninstall)
	orig=/sbin/modprobe
	if [ -f "$STATE/modprobe.orig" ]; then
		orig=$(cat "$STATE/modprobe.orig")
	fi
	if [ "$(current)" = "$HELPER" ]; then
		printf '%s\n' "$orig" >"$PROC_MODPROBE"
	fi
	rm -f "$DROPIN" "$LIBEXEC/kmodd-request" "$STATE/modprobe.orig"
	rmdir "$LIBEXEC" 2>/dev/null || true
	echo "kernel.modprobe = $(current)"
	;;
esac
