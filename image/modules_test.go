package image

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// syntheticDep mimics Debian 6.1's modules.dep for the appliance's
// modules, plus noise.
const syntheticDep = `kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/virtio/virtio_input.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/input/evdev.ko:
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/crypto/crc32c_generic.ko:
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko
kernel/drivers/misc/pvpanic/pvpanic-pci.ko: kernel/drivers/misc/pvpanic/pvpanic.ko
kernel/drivers/misc/pvpanic/pvpanic.ko:
kernel/sound/unrelated.ko: kernel/sound/unrelated-core.ko.xz
kernel/sound/unrelated-core.ko.xz:
`

func parse(t *testing.T, s string) *ModuleDeps {
	t.Helper()
	md, err := ParseModulesDep(strings.NewReader(s))
	if err != nil {
		t.Fatal(err)
	}
	return md
}

// checkOrder checks that every module comes after all its dependencies
// and appears once.
func checkOrder(t *testing.T, md *ModuleDeps, order []string) {
	t.Helper()
	pos := map[string]int{}
	for i, p := range order {
		n := modName(p)
		if _, dup := pos[n]; dup {
			t.Errorf("%s twice in %v", n, order)
		}
		pos[n] = i
	}
	for _, p := range order {
		for _, d := range md.Deps[modName(p)] {
			if dp, ok := pos[d]; !ok || dp > pos[modName(p)] {
				t.Errorf("%s loaded before its dependency %s: %v", p, d, order)
			}
		}
	}
}

func TestModuleOrder(t *testing.T) {
	md := parse(t, syntheticDep)
	t.Run("appliance", func(t *testing.T) {
		order, err := md.ModuleOrder(ApplianceModules, nil)
		if err != nil {
			t.Fatal(err)
		}
		want := []string{
			"kernel/drivers/virtio/virtio_ring.ko",
			"kernel/drivers/virtio/virtio.ko",
			"kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
			"kernel/drivers/virtio/virtio_pci_modern_dev.ko",
			"kernel/drivers/virtio/virtio_pci.ko",
			"kernel/drivers/block/virtio_blk.ko",
			"kernel/net/core/failover.ko",
			"kernel/drivers/net/net_failover.ko",
			"kernel/drivers/net/virtio_net.ko",
			"kernel/drivers/virtio/virtio_input.ko",
			"kernel/drivers/input/evdev.ko",
			"kernel/lib/crc16.ko",
			"kernel/fs/mbcache.ko",
			"kernel/fs/jbd2/jbd2.ko",
			"kernel/crypto/crc32c_generic.ko",
			"kernel/fs/ext4/ext4.ko",
			"kernel/drivers/misc/pvpanic/pvpanic.ko",
			"kernel/drivers/misc/pvpanic/pvpanic-pci.ko",
		}
		if diff := cmp.Diff(want, order); diff != "" {
			t.Errorf("order (-want +got):\n%s", diff)
		}
		checkOrder(t, md, order)
	})
	t.Run("dependencies pulled in", func(t *testing.T) {
		order, err := md.ModuleOrder([]string{"virtio_net", "ext4"}, nil)
		if err != nil {
			t.Fatal(err)
		}
		checkOrder(t, md, order)
		if len(order) != 9 {
			t.Errorf("got %d modules %v, want 9", len(order), order)
		}
	})
	t.Run("dash and compressed names", func(t *testing.T) {
		order, err := md.ModuleOrder([]string{"unrelated"}, nil)
		if err != nil {
			t.Fatal(err)
		}
		want := []string{"kernel/sound/unrelated-core.ko.xz", "kernel/sound/unrelated.ko"}
		if diff := cmp.Diff(want, order); diff != "" {
			t.Errorf("order (-want +got):\n%s", diff)
		}
	})
	t.Run("builtin skipped", func(t *testing.T) {
		md := parse(t, "kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko\nkernel/fs/jbd2/jbd2.ko:\n")
		order, err := md.ModuleOrder([]string{"crc16", "ext4"}, map[string]bool{"crc16": true})
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff([]string{"kernel/fs/jbd2/jbd2.ko", "kernel/fs/ext4/ext4.ko"}, order); diff != "" {
			t.Errorf("order (-want +got):\n%s", diff)
		}
	})
	for _, tc := range []struct{ name, dep, want string }{
		{"missing", "a.ko:\n", "module nosuch not found"},
		{"missing dependency", "nosuch.ko: b.ko\n", "module b (needed by nosuch) not found"},
		{"cycle", "nosuch.ko: b.ko\nb.ko: nosuch.ko\n", "cycle: nosuch -> b -> nosuch"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parse(t, tc.dep).ModuleOrder([]string{"nosuch"}, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestParseModulesDepErrors(t *testing.T) {
	if _, err := ParseModulesDep(strings.NewReader("no colon here\n")); err == nil {
		t.Error("no error for a line without a colon")
	}
	md := parse(t, "# comment\n\n a.ko :  b.ko  c.ko \n")
	if diff := cmp.Diff(map[string][]string{"a": {"b", "c"}}, md.Deps); diff != "" {
		t.Errorf("deps (-want +got):\n%s", diff)
	}
}

func TestModName(t *testing.T) {
	for in, want := range map[string]string{
		"kernel/drivers/net/virtio_net.ko": "virtio_net",
		"virtio-net":                       "virtio_net",
		"a/b/snd-hda.ko.xz":                "snd_hda",
		"x.ko.zst":                         "x",
	} {
		if got := modName(in); got != want {
			t.Errorf("modName(%q) = %q, want %q", in, got, want)
		}
	}
}
