package image

import (
	"fmt"
	"strings"
)

// The default appliance's guest side: the /init script, busybox init's
// inittab and the small files around them. They are plain text so that
// they enter the appliance ID as they are.

// Banner is the line /init prints once the modules are loaded and the
// network is starting; tests and the nested test host wait for it. It ends
// with the guest's own uptime (/proc/uptime, from the kernel's timekeeping
// start), which bench linux subtracts from the VMM's time to the banner:
// the rest is spent outside the guest kernel (VMM, loading, firmware).
const Banner = `Collective appliance: Linux $(uname -r), $(nproc) CPUs, up $(cut -d' ' -f1 /proc/uptime) s`

// BannerPrefix is the start of the banner as it appears on the console.
const BannerPrefix = "Collective appliance: Linux "

// debugExitPort is the VMM's debug-exit port (QEMU's isa-debug-exit at
// iobase 0xf4): a byte written there ends the VM with that exit code
// (QEMU exits with (code<<1)|1).
const debugExitPort = 0xF4

// exitCommand writes a 0 byte to the debug-exit port through /dev/port.
// Without ACPI, Linux's poweroff only halts the CPUs; this ends the VM.
var exitCommand = fmt.Sprintf(`printf '\000' | dd of=/dev/port bs=1 seek=%d count=1 2>/dev/null`, debugExitPort)

// rootFile is a file of the appliance's root file system.
type rootFile struct {
	Name string
	Mode uint32 // permission bits
	Text string
}

// initScript returns /init, run by the kernel as PID 1 (busybox sh). It
// loads modules (paths relative to /lib/modules/<version>) in order.
func initScript(version string, modules []string) string {
	var mods strings.Builder
	for _, m := range modules {
		mods.WriteString("\t" + m + " \\\n")
	}
	return `#!/bin/sh
# Collective default appliance: PID 1 until it execs busybox init.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=0620 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mount -t tmpfs -o nosuid,nodev tmpfs /tmp
hostname -F /etc/hostname

# Modules, each after the ones it depends on (from modules.dep).
for m in \
` + mods.String() + `	; do
	insmod /lib/modules/` + version + `/$m 2>/dev/null || echo "init: warning: insmod $m failed" >&2
done

ifconfig lo 127.0.0.1 netmask 255.0.0.0 up
if [ -e /sys/class/net/eth0 ]; then
	ifconfig eth0 up
	# In the background: the banner and the shell do not wait for DHCP.
	udhcpc -i eth0 -s /etc/udhcpc.script -t 3 -T 2 -A 10 -b -q >/dev/null 2>&1 &
fi

echo "` + Banner + `"
exec /sbin/init
`
}

// inittab is busybox init's configuration: a shell on the serial console,
// a getty on the first virtual terminal, and a shutdown action that ends
// the VM through the debug-exit port. busybox init runs the ::shutdown
// actions on poweroff (SIGUSR2), reboot (SIGTERM) and halt (SIGUSR1), so a
// clean shutdown always exits the VM with status 0.
var inittab = `# Collective default appliance: busybox init
# The serial console: a shell, with ttyS0 as its controlling terminal
# (cttyhack) so that job control and Ctrl-C work.
ttyS0::respawn:/bin/cttyhack /bin/sh -l
# The screen (VGA text or framebuffer console).
tty1::respawn:/sbin/getty 38400 tty1
::ctrlaltdel:/sbin/poweroff
::shutdown:/bin/sync
# End the VM: a 0 byte to the debug-exit port (0xf4). busybox init runs
# a command with shell syntax through /bin/sh -c.
::shutdown:` + exitCommand + `
`

// udhcpcScript configures eth0 from udhcpc's lease.
const udhcpcScript = `#!/bin/sh
# udhcpc event script: $1 is the event, the lease is in the environment.
case "$1" in
deconfig)
	ifconfig "$interface" 0.0.0.0
	;;
bound|renew)
	ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
	if [ -n "$router" ]; then
		while route del default gw 0.0.0.0 dev "$interface" 2>/dev/null; do :; done
		for r in $router; do route add default gw "$r" dev "$interface"; break; done
	fi
	: >/etc/resolv.conf
	[ -n "$domain" ] && echo "search $domain" >>/etc/resolv.conf
	for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
	;;
esac
exit 0
`

// rootFiles returns the appliance's text files.
func rootFiles(version string, modules []string) []rootFile {
	return []rootFile{
		{"init", 0o755, initScript(version, modules)},
		{"etc/inittab", 0o644, inittab},
		{"etc/udhcpc.script", 0o755, udhcpcScript},
		{"etc/hostname", 0o644, "collective\n"},
		// root has no password: the serial console is already a root shell,
		// and the screen belongs to the appliance's user.
		{"etc/passwd", 0o644, "root::0:0:root:/root:/bin/sh\n"},
		{"etc/group", 0o644, "root:x:0:\ntty:x:5:\n"},
		{"etc/profile", 0o644, "export PATH=/sbin:/bin:/usr/sbin:/usr/bin\nexport PS1='\\h:\\w\\$ '\ncd /root 2>/dev/null\n"},
		{"etc/resolv.conf", 0o644, ""},
	}
}
