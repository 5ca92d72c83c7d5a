#!/bin/sh
# make run: boot the default appliance (Debian's kernel, our busybox
# initramfs) with its serial console on this terminal.
#
# Where this host's KVM boots stock kernels (hardware KVM), collective run
# boots the appliance directly. Where it cannot (kvm-pvm, a software
# hypervisor that stops in a stock kernel's CPL0 code), the same appliance
# runs inside the nested test host (QEMU TCG with emulated SVM boots a Linux
# L1 with a hardware-style /dev/kvm; collective nested --appliance), with
# the console attached the same way.
#
# ARGS are flags for collective run in both paths, e.g.
# ARGS='--cpus 2 --disk d.img'; in the nested path this folder is shared
# into L1 and the run starts in it, so relative paths (d.img) work there too.
# Piped stdin is typed into the guest's serial console:
#   printf 'uname -r\npoweroff\n' | make run
#
# Environment: BIN (default bin/collective), ARGS, MEM (default 512M),
# NESTED=1 to force the nested path, NESTED=0 to force the direct one.
set -eu
cd "$(dirname "$0")/.."
bin=${BIN:-bin/collective}
args=${ARGS:-}
mem=${MEM:-512M}

say() { echo "make run: $*" >&2; }

# run CMD...: runs CMD with this terminal or the piped stdin. (The UART
# takes host input only once the guest's driver has opened the port, so
# nothing piped is lost while Linux probes COM1.)
run() {
	exec "$@"
}

# apt_install PACKAGE...: install Debian packages (as root, or with sudo).
apt_install() {
	sudo=
	[ "$(id -u)" = 0 ] || sudo=sudo
	say "installing $*"
	$sudo apt-get update -q >/dev/null &&
		DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "$@" >/dev/null
}

# is_pvm: this host's /dev/kvm is kvm-pvm (cannot boot a stock kernel).
is_pvm() {
	[ -d /sys/module/kvm_pvm ] && return 0
	[ -r /proc/modules ] && grep -qw '^kvm_pvm' /proc/modules && return 0
	return 1
}

if [ ! -e /dev/kvm ]; then
	say "no /dev/kvm on this host: Collective needs KVM (modprobe kvm_intel or kvm_amd, or enable virtualisation)"
	exit 1
fi

nested=${NESTED:-}
if [ -z "$nested" ]; then
	nested=0
	is_pvm && nested=1
fi

if [ "$nested" = 0 ]; then
	# The appliance: the kernel package download and busybox-static are
	# handled by the image builder (apt-get download into the cache); it
	# prints the paths, and rebuilds only when an input changed.
	info=$("$bin" image build default) || exit 1
	kernel=$(echo "$info" | sed -n 's/^kernel *\([^ ]*\).*/\1/p')
	initrd=$(echo "$info" | sed -n 's/^initrd *//p')
	cmdline=$(echo "$info" | sed -n 's/^cmdline *//p')
	say "booting the default appliance ($(basename "$(dirname "$kernel")" | cut -c1-12)); Ctrl-A x quits"
	# shellcheck disable=SC2086 # ARGS are words for collective run
	run "$bin" run --kernel "$kernel" --initrd "$initrd" --append "$cmdline" --mem "$mem" $args
fi

# The nested path needs QEMU and a static /bin/busybox for L1.
command -v qemu-system-x86_64 >/dev/null || apt_install qemu-system-x86
if ! ldd /bin/busybox 2>&1 | grep -q 'not a dynamic executable'; then
	apt_install busybox-static
fi
say "this host's KVM is kvm-pvm, which cannot boot a stock Linux kernel: running the appliance in the nested test host (QEMU TCG + SVM; about 20-30 s to a shell; Ctrl-] ends it)"
# shellcheck disable=SC2086
run "$bin" nested --appliance -- --mem "$mem" $args
