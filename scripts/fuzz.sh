#!/usr/bin/env bash
# Runs every fuzz target in ./fuzz for FUZZTIME each (default 30s), or only
# those matching FUZZ (a regular expression, e.g. FUZZ='Virtio|PCI').
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
# A package that does not build lists nothing: that is a failure, not an
# empty run.
if ! list=$($go test ./fuzz -list '^Fuzz' 2>&1); then
	echo "$list"
	echo "fuzz: go test ./fuzz -list failed"
	exit 1
fi
targets=$(echo "$list" | grep '^Fuzz' | grep -E "${FUZZ:-.}")
if [ -z "$targets" ]; then
	echo "fuzz: no target matches '${FUZZ:-.}'"
	exit 1
fi
for t in $targets; do
	echo "== $t ($fuzztime)"
	dir=fuzz/testdata/fuzz/$t
	before=$(ls "$dir" 2>/dev/null | sort)
	out=$($go test ./fuzz -run='^$' -fuzz="^$t\$" -fuzztime="$fuzztime" -fuzzminimizetime=100x 2>&1)
	rc=$?
	echo "$out" | tail -4
	after=$(ls "$dir" 2>/dev/null | sort)
	new=$(comm -13 <(echo "$before") <(echo "$after") | grep . || true)
	# The last progress line: elapsed time and total executions; the rate
	# is their ratio (Go prints per-interval rates, which jump around).
	execs=$(echo "$out" | grep -o 'execs: [0-9]*' | tail -1)
	n=${execs#execs: }
	secs=$(echo "$out" | grep -o 'elapsed: [0-9hms.]*' | tail -1 | sed 's/elapsed: //' |
		awk '{ t = 0; s = $0; if (match(s, /[0-9]+h/)) t += 3600 * substr(s, RSTART, RLENGTH - 1);
			if (match(s, /[0-9]+m/)) t += 60 * substr(s, RSTART, RLENGTH - 1);
			if (match(s, /[0-9.]+s/)) t += substr(s, RSTART, RLENGTH - 1); print t }')
	if [ -n "$n" ] && [ -n "$secs" ] && [ "$secs" != 0 ]; then
		execs="$execs, $(awk -v n="$n" -v s="$secs" 'BEGIN { printf "%d/s over %ss", n / s, s }')"
	fi
	if [ $rc -ne 0 ] && { [ -n "$new" ] || echo "$out" | grep -q 'Failing input written'; }; then
		failed=1
		summary+=("$t: CRASH${execs:+ ($execs)}")
		echo "$out"
		for f in $new; do echo "--- input $dir/$f:"; cat "$dir/$f"; done
	elif [ $rc -ne 0 ] && echo "$out" | grep -q 'context deadline exceeded'; then
		summary+=("$t: ok ($execs; Go's deadline race reported, no input written)")
	elif [ $rc -ne 0 ]; then
		failed=1
		summary+=("$t: FAILED${execs:+ ($execs)}")
		echo "$out"
	else
		summary+=("$t: ok ($execs)")
	fi
done
echo "== fuzz summary"
printf '%s\n' "${summary[@]}"
exit $failed
