package machine

import (
	"sync"

	"collective/kvm"
)

// maxMSIRoutes bounds the MSI routes one machine keeps: a guest that keeps
// reprogramming its MSI-X tables recycles the oldest instead of growing
// KVM's routing table without end.
const maxMSIRoutes = 128

type msiKey struct {
	addr uint64
	data uint32
}

type msiRoute struct {
	gsi uint32
	efd *kvm.EventFD
}

// msiRouter delivers MSI messages through KVM GSI routing and irqfds: the
// first time a device signals an (address, data) message it gets a GSI
// routed to that message and an eventfd bound to the GSI (KVM_IRQFD); from
// then on an interrupt is one eventfd write, which KVM turns into the
// interrupt without a trip through the VMM. It implements pci.MSIXSink.
// When a route cannot be made, it falls back to KVM_SIGNAL_MSI.
type msiRouter struct {
	vm     *kvm.VM
	router *kvm.GSIRouter

	mu     sync.Mutex
	routes map[msiKey]msiRoute // guarded by mu
	order  []msiKey            // guarded by mu; oldest first, for recycling
}

func newMSIRouter(vm *kvm.VM) *msiRouter {
	return &msiRouter{vm: vm, router: kvm.NewGSIRouter(vm), routes: make(map[msiKey]msiRoute)}
}

// SignalMSI implements pci.MSIXSink.SignalMSI.
func (r *msiRouter) SignalMSI(addr uint64, data uint32) error {
	k := msiKey{addr, data}
	r.mu.Lock()
	rt, ok := r.routes[k]
	if !ok {
		var err error
		if rt, err = r.addLocked(k); err != nil {
			r.mu.Unlock()
			return r.vm.SignalMSI(addr, data)
		}
	}
	r.mu.Unlock()
	return rt.efd.Signal()
}

// addLocked makes a route and irqfd for k, recycling the oldest route
// when there are maxMSIRoutes already.
func (r *msiRouter) addLocked(k msiKey) (msiRoute, error) {
	if len(r.order) >= maxMSIRoutes {
		old := r.order[0]
		r.order = r.order[1:]
		r.removeLocked(r.routes[old])
		delete(r.routes, old)
	}
	gsi, err := r.router.Alloc()
	if err != nil {
		return msiRoute{}, err
	}
	rt := msiRoute{gsi: gsi}
	if err := r.router.SetMSI(gsi, k.addr, k.data); err != nil {
		r.router.Release(gsi)
		return msiRoute{}, err
	}
	if rt.efd, err = kvm.NewEventFD(); err != nil {
		r.router.Release(gsi)
		return msiRoute{}, err
	}
	if err := r.vm.IRQFD(rt.efd.FD(), gsi); err != nil {
		rt.efd.Close()
		r.router.Release(gsi)
		return msiRoute{}, err
	}
	r.routes[k] = rt
	r.order = append(r.order, k)
	return rt, nil
}

func (r *msiRouter) removeLocked(rt msiRoute) {
	r.vm.RemoveIRQFD(rt.efd.FD(), rt.gsi)
	rt.efd.Close()
	r.router.Release(rt.gsi)
}

// close removes every route.
func (r *msiRouter) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, k := range r.order {
		r.removeLocked(r.routes[k])
	}
	r.routes, r.order = map[msiKey]msiRoute{}, nil
}
