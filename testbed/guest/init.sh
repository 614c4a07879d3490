#!/bin/sh
# /init of the test bed's initramfs (busybox sh, PID 1).
# Loads the virtio/9p/overlay modules, mounts the host root read-only over 9p
# with a tmpfs overlay on top, shares the project checkout read-write at the
# same path, then switch_root's into stage2.sh on the host's own userland.
# Settings come from the kernel command line as tb_NAME=VALUE.
export PATH=/bin
/bin/busybox --install -s /bin

fatal() {
    echo "TESTBED-FATAL: $*" >/dev/console
    sleep 1
    reboot -f
    sleep 10
}

mount -t devtmpfs devtmpfs /dev || fatal "cannot mount devtmpfs"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
exec </dev/console >/dev/console 2>&1

tb_share=
tb_rootcache=loose
tb_msize=512000
tb_venv=
for arg in $(cat /proc/cmdline); do
    case $arg in
        tb_*=*)
            key=${arg%%=*}
            case $key in *[!a-z_]*) continue ;; esac
            eval "$key=\${arg#*=}"
            ;;
    esac
done

# The checkout under test comes from the host (vm.py); there is no default, so
# a guest can never run some other checkout's code by accident.
[ -n "$tb_share" ] || fatal "no tb_share= on the kernel command line"

while read -r mod; do
    insmod "/lib/modules/$mod.ko" || fatal "insmod $mod failed"
done </lib/modules/order

opts=trans=virtio,version=9p2000.L,msize=$tb_msize
mount -t 9p -o "$opts,ro,cache=$tb_rootcache" hostroot /lower \
    || fatal "cannot mount the host root over 9p (mount_tag hostroot)"
mount -t tmpfs -o mode=0755 tmpfs /ovl || fatal "cannot mount tmpfs"
mkdir -p /ovl/upper /ovl/work
mount -t overlay -o lowerdir=/lower,upperdir=/ovl/upper,workdir=/ovl/work overlay /newroot \
    || fatal "cannot mount the overlay on the host root"
# tmpfs on /run and /tmp first, so a checkout below them is mounted on top.
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run || fatal "cannot mount /run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /newroot/tmp || fatal "cannot mount /tmp"
mkdir -p "/newroot$tb_share"
[ -d "/newroot$tb_share" ] || fatal "$tb_share does not exist on the host"
mount -t 9p -o "$opts,cache=none" share "/newroot$tb_share" \
    || fatal "cannot mount the project checkout over 9p (mount_tag share)"
# The virtual environment is read-mostly and Python imports are stat-heavy:
# the host exports it a second time (mount_tag venv) and it is mounted
# read-only with the page and dentry caches on (cache=loose), several times
# faster than the coherent mount of the checkout.
if [ -n "$tb_venv" ]; then
    mount -t 9p -o "$opts,ro,cache=loose" venv "/newroot$tb_venv" \
        || echo "TESTBED: warning: no cached mount for $tb_venv"
fi
for d in dev proc sys; do
    mount --move "/$d" "/newroot/$d" || fatal "cannot move /$d"
done
mkdir -p /newroot/run/testbed
cp /testbed/*.sh /newroot/run/testbed/
exec switch_root /newroot /bin/sh /run/testbed/stage2.sh
fatal "switch_root failed"
