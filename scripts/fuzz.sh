#!/usr/bin/env bash
# Runs every fuzz target in ./fuzz for FUZZTIME each (default 30s).
#
# A target fails the run when it finds a crasher: Go writes the input under
# fuzz/testdata/fuzz/<Target>/, and this script prints it. Go 1.26's fuzz
# coordinator can also end a healthy run with a bare "context deadline
# exceeded" at the -fuzztime boundary (golang/go#75804, fixed in Go 1.27);
# with no input written, that is reported as a warning, not a failure.
# Seed corpora are replayed as ordinary tests by `go test ./fuzz`.
set -uo pipefail
cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-30s}
go=${GO:-go}
failed=0
summary=()
for t in $($go test ./fuzz -list '^Fuzz' | grep '^Fuzz'); do
	echo "== $t ($fuzztime)"
	dir=fuzz/testdata/fuzz/$t
	before=$(ls "$dir" 2>/dev/null | sort)
	out=$($go test ./fuzz -run='^$' -fuzz="^$t\$" -fuzztime="$fuzztime" -fuzzminimizetime=100x 2>&1)
	rc=$?
	echo "$out" | tail -4
	after=$(ls "$dir" 2>/dev/null | sort)
	new=$(comm -13 <(echo "$before") <(echo "$after") | grep . || true)
	execs=$(echo "$out" | grep -o 'execs: [0-9]*' | tail -1)
	if [ $rc -ne 0 ] && { [ -n "$new" ] || echo "$out" | grep -q 'Failing input written'; }; then
		failed=1
		summary+=("$t: CRASH ($execs)")
		echo "$out"
		for f in $new; do echo "--- input $dir/$f:"; cat "$dir/$f"; done
	elif [ $rc -ne 0 ] && echo "$out" | grep -q 'context deadline exceeded'; then
		summary+=("$t: ok ($execs; Go's deadline race reported, no input written)")
	elif [ $rc -ne 0 ]; then
		failed=1
		summary+=("$t: FAILED ($execs)")
		echo "$out"
	else
		summary+=("$t: ok ($execs)")
	fi
done
echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
exit $failed
