#!/usr/bin/env bash
# The README's test command (make test) minus fuzzing: go vet, then every
# package's tests. The nested-world packages (real Linux under QEMU TCG with
# emulated SVM) run last, and a test of theirs that fails is run once more.
# The retry was for L1 hanging for good (once in 10-40 L2 boots), whose
# cause has since been removed (KVM's kernel-text patching as L2 machines
# came and went, which QEMU's multi-threaded TCG livelocked on;
# nested.HoldKVM); it stays as a safety net. A test that fails twice fails
# the run. Every retry is printed with the first failure's output.
set -uo pipefail
cd "$(dirname "$0")/.."
go=${GO:-go}
nested='collective/(e2e|nested)$'

$go vet ./... || exit 1
$go vet -tags vmm ./cmd/collective/... || exit 1 # collective, the VMM build
$go test -count=1 -timeout 40m $($go list ./... | grep -Ev "$nested") || exit 1

status=0
for pkg in $($go list ./... | grep -E "$nested"); do
	log=$(mktemp)
	if $go test -count=1 -timeout 30m -v "$pkg" >"$log" 2>&1; then
		grep -E '^(--- |ok|PASS|FAIL)' "$log"
		rm -f "$log"
		continue
	fi
	cat "$log"
	failed=$(grep -E '^--- FAIL: Test' "$log" | awk '{print $3}' | sort -u | paste -sd'|')
	rm -f "$log"
	if [ -z "$failed" ]; then
		status=1 # it did not build, or failed outside a test
		continue
	fi
	echo "== $pkg: running $failed once more (nested-virtualisation hangs are retried once)"
	$go test -count=1 -timeout 30m -v -run "^($failed)\$" "$pkg" || status=1
done
exit $status
