#!/bin/sh
# PID 1 of the test bed after switch_root: the host's userland (dash) over the
# read-only 9p root with a tmpfs overlay.  Finishes the mounts, then either
# starts the guest agent (tb_mode=agent) or runs one command with its output on
# the console and powers off (tb_mode=console).
tb_share=
tb_mode=agent
tb_mbox=
tb_modprobe=/bin/true
tb_agent_tty=/dev/ttyS1
for arg in $(cat /proc/cmdline); do
    case $arg in
        tb_*=*)
            key=${arg%%=*}
            case $key in *[!a-z_]*) continue ;; esac
            eval "$key=\${arg#*=}"
            ;;
    esac
done

poweroff_now() {
    echo b >/proc/sysrq-trigger   # QEMU runs with -no-reboot: a reboot ends it
    sleep 10
}

[ -n "$tb_share" ] || { echo "TESTBED-FATAL: no tb_share= on the kernel command line"; poweroff_now; }

mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr
[ "$tb_modprobe" = keep ] || echo "$tb_modprobe" >/proc/sys/kernel/modprobe
echo testbed >/proc/sys/kernel/hostname
mkdir -p /run/lock /var/tmp 2>/dev/null

export PATH="$tb_share/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
export HOME=/root LANG=C.UTF-8 TERM=dumb TESTBED_GUEST=1
cd "$tb_share" || poweroff_now

case $tb_mode in
    agent)
        echo "TESTBED: starting agent on $tb_agent_tty, mailbox $tb_mbox"
        setsid /bin/sh /run/testbed/agent.sh "$tb_mbox" "$tb_agent_tty" </dev/null &
        ;;
    console)
        echo "TESTBED: running $tb_mbox/main.cmd"
        /bin/sh "$tb_mbox/main.cmd" </dev/null
        rc=$?
        echo "$rc" >"$tb_mbox/main.rc.tmp" && mv -f "$tb_mbox/main.rc.tmp" "$tb_mbox/main.rc"
        echo "TESTBED-EXIT $rc"
        poweroff_now
        ;;
    *)
        echo "TESTBED-FATAL: unknown tb_mode=$tb_mode"
        poweroff_now
        ;;
esac

# Reap orphans forever (PID 1 must not exit).
while :; do
    wait
    sleep 1
done
