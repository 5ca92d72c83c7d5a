package machine

import (
	"collective/devices/virtioblk"
)

// Disk is one --disk of a machine, as snapshots and migration see it.
type Disk struct {
	// Name is the virtio device's name (virtio-blk0, ...), as in
	// MachineState.Virtio.
	Name string
	// Spec is the parsed --disk argument.
	Spec virtioblk.DiskSpec
	// Block is the device.
	Block *virtioblk.Block
	// Tracker is the device's backend: it records written blocks.
	Tracker *virtioblk.Tracker
}

// Disks returns the machine's disks in --disk order.
func (m *Machine) Disks() []Disk {
	var out []Disk
	k := 0
	for _, d := range m.virtio {
		b, ok := d.transport.Device().(*virtioblk.Block)
		if !ok {
			continue
		}
		tr, _ := b.Backend().(*virtioblk.Tracker)
		var spec virtioblk.DiskSpec
		if k < len(m.cfg.Disks) {
			spec, _ = virtioblk.ParseDisk(m.cfg.Disks[k])
		}
		k++
		out = append(out, Disk{Name: d.name, Spec: spec, Block: b, Tracker: tr})
	}
	return out
}
