# Collective: the plain entry points. `make help` lists them.

GO        ?= go
BIN       := bin/collective
TOOLS     := bin/collective-tools
GUEST     := guest/build/guest.elf
ARGS      ?=
FUZZTIME  ?= 30s

.PHONY: help build guest run run-guest test test-short fuzz bench vet clean deps

help:
	@echo "make run        build and boot the default appliance on the serial console (ARGS='...' adds flags)"
	@echo "make run-guest  boot the workload guest (guest/) instead"
	@echo "make test       run the whole test suite (what CI runs)"
	@echo "make fuzz       run every fuzz target for FUZZTIME each (default $(FUZZTIME))"
	@echo "make bench      benchmarks against QEMU, printed as tables"

build: $(BIN) guest

# collective is cmd/collective built with only run and restore (-tags
# vmm), so that the process running a guest links nothing else; next to
# it, collective-tools is the full build, which collective execs for
# every other command (bench, image, nested, ctl, ...).
$(BIN): FORCE
	CGO_ENABLED=0 $(GO) build -tags vmm -o $(BIN) ./cmd/collective
	CGO_ENABLED=0 $(GO) build -o $(TOOLS) ./cmd/collective

guest:
	$(MAKE) -C guest

# deps installs what the tests and benchmarks need on a Debian host.
deps:
	@missing=""; \
	command -v gcc >/dev/null || missing="$$missing gcc"; \
	command -v qemu-system-x86_64 >/dev/null || missing="$$missing qemu-system-x86"; \
	command -v xz >/dev/null || missing="$$missing xz-utils"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

# run boots the default appliance (Debian's kernel, our initramfs) with
# the serial console on this terminal: directly where KVM boots stock
# kernels, in the nested test host where it is kvm-pvm (scripts/run.sh).
# ARGS='--cpus 2 --disk d.img' adds flags for collective run in both paths.
run: $(BIN)
	@BIN=$(BIN) ARGS="$(ARGS)" scripts/run.sh

# run-guest boots the workload guest, which says hello and exits 0.
run-guest: build
	$(BIN) run --kernel $(GUEST) --append "$(or $(APPEND),hello)" --mem 128M $(ARGS)

test: deps build
	GO=$(GO) scripts/test.sh
	$(MAKE) fuzz FUZZTIME=$(FUZZTIME)

test-short:
	$(GO) test -short ./...

fuzz:
	FUZZTIME=$(FUZZTIME) GO=$(GO) scripts/fuzz.sh

bench: build
	$(BIN) bench all

vet:
	gofmt -l . | (! grep .) || (echo "gofmt needed" && false)
	$(GO) vet ./...
	$(GO) vet -tags vmm ./cmd/collective/...

clean:
	rm -rf bin guest/build

FORCE:
