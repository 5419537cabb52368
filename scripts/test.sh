#!/usr/bin/env bash
# `make test`: the whole suite as two pytest processes at once: the real Ray + DeepSpeed runs (`-m slow`), in
# file order, and beside them the in-process tests (`-m "not slow"`). The two split the suite exactly.
#
# Why: on a 2-core machine the slow tests leave the CPUs idle about a quarter of the time (Ray and its workers
# starting, controllers polling, processes exiting; vmstat's mean idle was 26% over a serial run), and the
# in-process tests use some of it. The gain is about a minute, not their whole 2.5 minutes: in a fresh clone the
# suite took 22 min 49 s against 23 min 9 s serial, on a machine running the later, uncontended tests ~3%
# slower, while the cluster tests that ran beside the in-process ones took ~100 s longer. The slow tests stay in
# one process because they share session fixtures (the quickstart run) that a second process would build again;
# moving the cluster tests beside them as well gained nothing (the CPUs were then busy throughout).
# pytest-xdist's `--dist loadgroup` could express the split with marks, but with pytest 9.2 it silently
# ignores them (it renames `item._nodeid`, which pytest no longer reads) and the quickstart ran twice.
#
# Arguments go to both (e.g. -x, --durations=60). The in-process report is printed after the slow one.
# Exit status: the slow run's if it failed, else the in-process run's, so pytest's 5 ("no tests ran") fails
# the build like any other non-zero code.
set -uo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp "${TMPDIR:-/tmp}/korch-in-process-tests.XXXXXX")
.venv/bin/python -m pytest -m "not slow" "$@" >"$log" 2>&1 &
in_process=$!
trap 'kill "$in_process" 2>/dev/null; rm -f "$log"; exit 130' INT TERM
.venv/bin/python -m pytest -m slow "$@"
slow_status=$?
wait "$in_process"
in_process_status=$?
trap - INT TERM
echo
echo "==================== in-process tests (-m 'not slow'), run beside the slow ones ===================="
cat "$log"
rm -f "$log"
echo "[test] slow tests: exit $slow_status; in-process tests: exit $in_process_status"
[ "$slow_status" -ne 0 ] && exit "$slow_status"
exit "$in_process_status"
