package machine

import "fmt"

// RestoreState sets every device's and vCPU's saved state on m, a machine
// built by NewBare whose guest RAM the caller has already filled: the
// last step of an incoming live migration, where RAM arrives over the
// wire before the state does. st must have m's memory size and vCPU
// count. On error the machine must not be run: close it.
//
// Preconditions: m's vCPUs have not run.
func (m *Machine) RestoreState(st *MachineState) error {
	if err := st.Validate(); err != nil {
		return err
	}
	if st.MemSize != m.cfg.MemSize || st.CPUs != m.cfg.CPUs {
		return badConfig("machine: restore state: the state has %d bytes and %d vCPUs, the machine %d and %d",
			st.MemSize, st.CPUs, m.cfg.MemSize, m.cfg.CPUs)
	}
	if err := m.restore(st); err != nil {
		return fmt.Errorf("machine: restore state: %w", err)
	}
	return nil
}
