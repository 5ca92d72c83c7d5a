#!/bin/busybox sh
# /init of the nested test host (L1), written by package nested.
# Kernel messages go to ttyS0. The control channel is the virtio-serial
# port nested.ctl (fd 3): the host sends "RUN|CON <id> <bytes> <timeout-s>
# tty|raw|-\n" and the script's bytes; this loop runs the script and
# answers "\n@@NESTED-EXIT <id> <status> ok|timeout@@" (no newline after).
# CON jobs run on the virtio console hvc0 (fd 4). virtio-serial rather than
# 16550 UARTs: under TCG and load the UARTs here lost bytes (a whole
# 16-byte FIFO at times); virtqueues do not.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /tmp /run /host /root
mount -t devpts devpts /dev/pts
mount -t tmpfs tmp /tmp

say() { printf '\n@@NESTED-%s@@' "$*" >&3; }
fail() {
	printf '\n@@NESTED-FAIL %s@@\n' "$*" >/dev/ttyS0
	poweroff -f
}

while read -r m; do
	insmod "/lib/modules/$m" 2>/tmp/insmod.err ||
		printf 'nested: insmod %s: %s\n' "$m" "$(cat /tmp/insmod.err)" >/dev/ttyS0
done </etc/nested/modules
if [ ! -c /dev/kvm ]; then
	fail "no /dev/kvm: $(grep -c svm /proc/cpuinfo) CPUs with svm; $(dmesg | grep -i -e kvm -e svm | tail -n 3 | tr '\n' ' ')"
fi
ctl=
for i in $(seq 100); do
	for d in /sys/class/virtio-ports/*; do
		[ "$(cat "$d/name" 2>/dev/null)" = nested.ctl ] && ctl=/dev/${d##*/}
	done
	[ -c "$ctl" ] && [ -c /dev/hvc0 ] && break
	sleep 0.1
done
[ -c "$ctl" ] || fail "no virtio-serial port nested.ctl"
[ -c /dev/hvc0 ] || fail "no virtio console hvc0"
# Both stay open for L1's life.
exec 3<>"$ctl" 4<>/dev/hvc0
chmod 666 /dev/kvm
# One idle VM held for L1's life, so that KVM does not rewrite kernel text
# (static keys) each time an L2 machine starts or ends: under multi-threaded
# TCG that patching livelocked L1 now and then (nested.HoldKVM).
/bin/collective-tools nested --hold-kvm </dev/null >/dev/ttyS0 2>&1 &
workdir=/
if [ -e /etc/nested/share ]; then
	if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 host /host 2>/tmp/mount.err; then
		workdir=/host
	else
		printf 'nested: mount /host: %s\n' "$(cat /tmp/mount.err)" >/dev/ttyS0
	fi
fi
ip link set lo up 2>/dev/null

say "READY $(cut -d' ' -f1 /proc/uptime)"

# job runs its arguments (setsid ...) in the background with stdin from
# fd 6 (a background command's own stdin would be /dev/null), kills their
# session after $t seconds, and sets st (the exit status) and flag.
job() {
	rm -f /tmp/timedout
	cd "$workdir"
	"$@" <&6 6<&- &
	pid=$!
	( sleep "$t"; touch /tmp/timedout; kill -KILL -"$pid" ) 2>/dev/null &
	wd=$!
	wait "$pid"
	st=$?
	kill "$wd" 2>/dev/null
	kill -KILL -"$pid" 2>/dev/null
	cd /
	flag=ok
	[ -e /tmp/timedout ] && flag=timeout
}

while read -r verb id n t mode <&3; do
	head -c "$n" <&3 >/tmp/job.sh
	case $verb in
	RUN)
		job setsid sh /tmp/job.sh 6</dev/null >&3 2>&3
		;;
	CON)
		if [ "$mode" = raw ]; then stty raw -echo <&4; else stty sane -onlcr <&4; fi
		say "STARTED $id"
		# hvc0 becomes the script's controlling terminal (Ctrl-C works in a
		# shell); when the session leader exits the kernel hangs it up and
		# drops output not sent yet, so the leader waits for the output to
		# drain first (stty sets the mode with TCSADRAIN).
		job setsid -c sh -c 'sh /tmp/job.sh; st=$?; stty "$(stty -g)"; exit $st' 6</dev/hvc0 >/dev/hvc0 2>&1
		# The session leader's exit hung up hvc0 (its controlling
		# terminal): open it again.
		exec 4<>/dev/hvc0
		stty sane <&4
		printf '@@NESTED-END %s@@' "$id" >&4
		;;
	*)
		st=127 flag=ok
		echo "nested: unknown verb $verb" >&3
		;;
	esac
	say "EXIT $id $st $flag"
done
fail "control channel closed"
