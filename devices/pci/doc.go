// Package pci models a conventional PCI bus 0 behind a host bridge, reached
// by configuration mechanism 1 (PCI Local Bus Specification 3.0, section
// 3.2.2.3.2: CONFIG_ADDRESS at port 0xCF8, CONFIG_DATA at 0xCFC-0xCFF), with
// type 0 configuration headers (section 6.1), base address registers and
// their sizing (section 6.2.5.1), capability lists (section 6.7) and the
// MSI-X capability (section 6.8.2), plus INTx (pin A) as a fallback.
//
// # Model
//
// A Config is one function's 256-byte configuration space. Every byte has a
// write mask (read-only bits never change) and a write-1-to-clear mask (the
// status register's error bits). BARs are programmed through their
// registers: writing all ones and reading back yields the size mask. When
// the guest moves a BAR, or turns memory decoding on or off in the command
// register, the Config calls the BARMapper the Bus was given, so the BAR's
// window moves on the MMIO bus (MMIOMapper does that for a *bus.Bus). Only
// memory BARs (32- and 64-bit) exist; I/O BARs are not modelled.
//
// A Bus holds up to 32 single-function devices on bus 0; slot 0 is the host
// bridge (8086:29c0). It is one devices.Device for ports 0xCF8-0xCFF
// (ConfigIOBase, ConfigIOSize): the 4-byte CONFIG_ADDRESS register at offset
// 0 and the CONFIG_DATA window at offsets 4-7. Absent devices, other buses,
// functions other than 0 and a cleared enable bit read as all ones.
// Bus.Add plays the firmware: it assigns every BAR an address from the
// memory window the machine gave and turns on memory decoding.
//
// MSI-X: a function's MSIX holds the vector table and the pending-bit array
// (PBA); the device routes its BAR accesses at the table and PBA offsets to
// MSIX.ReadTable/WriteTable/ReadPBA. Signal delivers a vector through an
// MSIXSink (for KVM: *kvm.VM, whose SignalMSI is KVM_SIGNAL_MSI), or sets its
// pending bit while the vector or the whole function is masked and delivers
// it when unmasked.
//
// # Cost
//
// Linux probes configuration space tens of thousands of times at boot. A
// configuration read is an address decode, an array index and a copy under
// a per-function mutex: no allocation (see BenchmarkConfigRead).
//
// # Concurrency
//
// All types are safe for concurrent use. Lock order:
//
//	Config.wmu (serialises configuration writes, held across BARMapper calls)
//	  Config.mu (configuration bytes)
//	MSIX.mu (table, PBA), taken after Config.wmu, never with Config.mu held
//	  the MSIXSink and IRQLine (called with MSIX.mu or Config.mu held; they
//	  must not call back into the function)
//
// # Security
//
// Every access from the guest is untrusted: any offset and size is
// accepted without panicking; unsupported accesses read as all ones and
// writes to them are dropped.
package pci
