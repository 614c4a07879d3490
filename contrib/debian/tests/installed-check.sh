#!/bin/sh
# installed-check.sh: check an installed kmodd package from inside the system
# it is installed in (a chroot, or a booted image), as root.
#
#   sh installed-check.sh [--no-takeover]
#
# Checks the files at their Debian paths, the baked-in helper settings,
# --version, the man pages, bash completion, systemd-analyze verify (when
# systemd is there), that installing enabled nothing, and -- unless
# --no-takeover -- kmodd-takeover enable then disable, twice each, at the file
# level (systemctl, udevadm and update-initramfs may be missing or fail in a
# chroot; the takeover then only warns).  Prints one line per check and
# exits 1 if any failed.
set -u

TAKEOVER=1
case ${1-} in
--no-takeover) TAKEOVER= ;;
'') ;;
*) echo "usage: installed-check.sh [--no-takeover]" >&2; exit 2 ;;
esac

failed=0
ok() { printf 'ok    %s\n' "$*"; }
bad() { printf 'FAIL  %s\n' "$*"; failed=1; }
check() {  # check DESCRIPTION COMMAND...
	what=$1
	shift
	if "$@" >/tmp/kmodd-check.out 2>&1; then
		ok "$what"
	else
		bad "$what"
		sed 's/^/      /' /tmp/kmodd-check.out
	fi
}

version=$(dpkg-query -W -f='${Version}' kmodd 2>/dev/null)
[ -n "$version" ] && ok "kmodd $version is installed" || bad "kmodd is not installed"

for f in /usr/sbin/kmodd /usr/bin/kmodctl /usr/libexec/kmodd/kmodd-request \
	/usr/sbin/kmodd-takeover; do
	check "executable $f" test -x "$f"
done
for f in /usr/sbin/kmodd /usr/bin/kmodctl; do
	check "$f: the lean entry point (no import re)" sh -c "! grep -q '^import re' $f"
done
dropin=systemd-modules-load.service.d/50-kmodd.conf
for f in /lib/systemd/system/kmodd.service /usr/lib/kmodd/udev/80-drivers.rules \
	/usr/lib/kmodd/systemd/$dropin \
	/usr/share/bash-completion/completions/kmodctl /usr/share/doc/kmodd/systemd.md \
	/usr/share/doc/kmodd/copyright; do
	check "file $f" test -f "$f"
done
# Nothing active at install time.
for f in /etc/udev/rules.d/80-drivers.rules /etc/sysctl.d/50-kmodd.conf \
	/usr/lib/sysctl.d/50-kmodd.conf /etc/systemd/system/sysinit.target.wants/kmodd.service \
	/etc/systemd/system/$dropin /lib/systemd/system/$dropin /usr/lib/systemd/system/$dropin; do
	check "not installed: $f" test ! -e "$f"
done
check "no kmodd-request on PATH (the kernel runs /usr/libexec's)" \
	sh -c '! command -v kmodd-request && ! command -v kmodd-request-py'

helper=/usr/libexec/kmodd/kmodd-request
check "the helper is the POSIX sh one" sh -c "head -n 1 $helper | grep -qx '#!/bin/sh'"
check "the helper falls back to modprobe" grep -q '^: "${KMODD_FALLBACK:=modprobe}"' "$helper"
check "the helper's kmodctl is /usr/bin/kmodctl" \
	grep -q '^: "${KMODD_KMODCTL:=/usr/bin/kmodctl}"' "$helper"
check "the helper parses" sh -n "$helper"
# Without a daemon the helper loads directly: a "-r" (not a load request) is
# passed to modprobe, which must be the one it finds.
check "the helper finds /sbin/modprobe" test -x /sbin/modprobe

check "kmodd --version" sh -c "[ \"\$(kmodd --version)\" = 'kmodd $version' ]"
check "kmodctl --version" sh -c "[ \"\$(kmodctl --version)\" = 'kmodctl $version' ]"
check "kmodd-takeover --version" \
	sh -c "[ \"\$(kmodd-takeover --version)\" = 'kmodd-takeover $version' ]"
check "kmodd --show-config" sh -c 'kmodd --show-config | grep -q "^idle_timeout = .*# "'
check "python3 imports kmodd from the package" \
	sh -c 'python3 -c "import kmodd, kmodd.daemon.service, kmodd.daemon.uevents, kmodd.daemon.kernelreq; print(kmodd.__file__)" | grep -q ^/usr/lib/python3/dist-packages/'
check "man -w kmodd kmodctl kmodd-request kmodd.conf kmodd-takeover" \
	man -w kmodd kmodctl kmodd-request kmodd.conf kmodd-takeover

if command -v systemd-analyze >/dev/null 2>&1; then
	check "systemd-analyze verify kmodd.service (man pages included)" \
		sh -c 'out=$(systemd-analyze verify /lib/systemd/system/kmodd.service 2>&1); rc=$?
			echo "$out"; [ $rc -eq 0 ] && ! echo "$out" | grep -q kmodd'
else
	ok "systemd-analyze verify skipped: systemd is not installed here"
fi

# Completion, through bash-completion's loader as an interactive shell has it.
complete_line() {  # words... -> COMPREPLY, one per line
	bash -c '
		. /usr/share/bash-completion/bash_completion 2>/dev/null
		_completion_loader kmodctl 2>/dev/null || . /usr/share/bash-completion/completions/kmodctl
		COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1))
		COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}
		_kmodctl kmodctl "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
		printf "%s\n" "${COMPREPLY[@]}"' bash "$@"
}
completes_exactly() {  # expected words...
	want=$1
	shift
	[ "$(complete_line "$@")" = "$want" ]
}
offers() {  # expected words...
	want=$1
	shift
	complete_line "$@" | grep -qx "$want"
}
check "completion: kmodctl lo<TAB> -> load" completes_exactly load kmodctl lo
check "completion: kmodctl crit<TAB> -> critical-chain" \
	completes_exactly critical-chain kmodctl crit
# A module name from the running kernel's modules.dep when there is one
# (a booted image), else from a small tree given with -d/-S.
dep=/lib/modules/$(uname -r)/modules.dep
tree=
if [ -r "$dep" ]; then
	name=$(sed -n '1{s/:.*//;s|.*/||;s/\.ko.*//;y/-/_/;p}' "$dep")
	set -- kmodctl load
else
	tree=$(mktemp -d)
	mkdir -p "$tree/lib/modules/0.0-check"
	echo "kernel/fs/minix/minix.ko.xz:" >"$tree/lib/modules/0.0-check/modules.dep"
	name=minix
	set -- kmodctl load -d "$tree" -S 0.0-check
fi
prefix=$(printf %s "$name" | cut -c1-3)
check "completion: $* $prefix<TAB> offers $name" offers "$name" "$@" "$prefix"
[ -z "$tree" ] || rm -rf "$tree"

if [ -n "$TAKEOVER" ]; then
	rule=/etc/udev/rules.d/80-drivers.rules
	sysctl=/etc/sysctl.d/50-kmodd.conf
	for round in 1 2; do
		check "takeover enable (round $round)" kmodd-takeover enable
		check "  udev rule in place" cmp /usr/lib/kmodd/udev/80-drivers.rules "$rule"
		check "  sysctl drop-in names the helper" \
			grep -qx "kernel.modprobe = /usr/libexec/kmodd/kmodd-request" "$sysctl"
		check "  systemd-modules-load drop-in in place" \
			cmp "/usr/lib/kmodd/systemd/$dropin" "/etc/systemd/system/$dropin"
		if command -v systemctl >/dev/null 2>&1; then
			check "  kmodd.service enabled" \
				test -L /etc/systemd/system/sysinit.target.wants/kmodd.service
		fi
	done
	check "takeover status" sh -c 'kmodd-takeover status | grep -q "(kmodd'"'"'s)"'
	if command -v systemd-analyze >/dev/null 2>&1; then
		# The drop-in orders systemd-modules-load after kmodd: no cycle in
		# a boot with both (kmodd enabled by the takeover above).
		check "  no ordering cycle in the boot with the takeover" \
			sh -c 'out=$(systemd-analyze verify --man=no kmodd.service default.target 2>&1)
				echo "$out"; ! echo "$out" | grep -qi cycl'
	fi
	for round in 1 2; do
		check "takeover disable (round $round)" kmodd-takeover disable
		check "  udev rule gone" test ! -e "$rule"
		check "  sysctl drop-in gone" test ! -e "$sysctl"
		check "  systemd-modules-load drop-in gone" test ! -e "/etc/systemd/system/$dropin"
		check "  kmodd.service not enabled" \
			test ! -e /etc/systemd/system/sysinit.target.wants/kmodd.service
		check "  nothing saved" test ! -e /var/lib/kmodd/modprobe.orig
	done
	# Someone else's rule is never overwritten.
	made=
	[ -d /etc/udev/rules.d ] || made=1
	[ -d /etc/udev ] || made=2
	mkdir -p /etc/udev/rules.d
	echo '# the administrator'"'"'s own' >"$rule"
	check "takeover refuses a foreign rule" sh -c '! kmodd-takeover enable --no-start'
	check "  and leaves it alone" grep -q administrator "$rule"
	check "  and leaves the kernel helper alone" test ! -e "$sysctl"
	rm -f "$rule"
	# Leave the system as found.
	[ -z "$made" ] || rmdir /etc/udev/rules.d
	[ "$made" != 2 ] || rmdir /etc/udev
fi

rm -f /tmp/kmodd-check.out
if [ $failed -ne 0 ]; then
	echo "installed-check: FAILED"
	exit 1
fi
echo "installed-check: all checks passed"
