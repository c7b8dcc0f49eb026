#!/usr/bin/env bash
# The fuzzers' long mode: ./dev fuzz {grad|forward|wiring} PROGRAMS [FIRST_SEED] [JOBS]
#
# Runs PROGRAMS new random programs (for wiring: families of up to 4 programs that differ
# in one place) in processes of at most 250 (wiring: 60 families) (seeds FIRST_SEED,
# FIRST_SEED+1, ...), JOBS processes at a time (default 1). A process that has compiled
# some hundreds of programs can crash inside torch_xla (seen once, at about 330), so each
# process stays under that. Logs go to fuzz-logs/: KIND_SEED.log (pytest's output, with
# a failure's shrunk program) and, for grad, KIND_SEED.programs (each program before it
# runs: the last one is the culprit if a process dies). Exits non-zero if any process failed.
set -uo pipefail
usage="usage: ./dev fuzz grad|forward|wiring PROGRAMS [FIRST_SEED] [JOBS]"
kind="${1:?$usage}"; total="${2:?$usage}"
first="${3:-1}"; jobs="${4:-1}"; chunk=250; unit=programs
case "$kind" in
  grad) file=tests/test_grad_fuzz.py; count=XLA_LOOP_GRAD_FUZZ_EXAMPLES; seedvar=XLA_LOOP_GRAD_FUZZ_SEED ;;
  forward) file=tests/test_fuzz.py; count=XLA_LOOP_FUZZ_EXAMPLES; seedvar=XLA_LOOP_FUZZ_SEED ;;
  wiring) file=tests/test_wiring_fuzz.py; count=XLA_LOOP_WIRING_FUZZ_EXAMPLES; seedvar=XLA_LOOP_WIRING_FUZZ_SEED; chunk=60; unit=families ;;
  *) echo "fuzz: KIND is grad, forward or wiring" >&2; exit 2 ;;
esac
mkdir -p fuzz-logs
run_seed() {  # seed programs
  local seed=$1 n=$2 log="fuzz-logs/${kind}_$1"
  rm -f "$log.programs"
  env "$count=$n" "$seedvar=$seed" XLA_LOOP_FUZZ_LOG="$log.programs" \
    .venv/bin/python -m pytest -q "$file" -p no:cacheprovider --hypothesis-show-statistics > "$log.log" 2>&1
  local rc=$? ran
  ran=$(grep -c '^# program' "$log.programs" 2>/dev/null); ran=${ran:-0}
  if [ $rc -eq 0 ]; then echo "seed $seed: $n $unit, passed"; else echo "seed $seed: FAILED (exit $rc; $ran $unit logged; see $log.log)"; fi
  return $rc
}
seed=$first; left=$total; pids=(); failed=0
while [ "$left" -gt 0 ]; do
  n=$(( left < chunk ? left : chunk ))
  run_seed "$seed" "$n" & pids+=($!)
  seed=$((seed + 1)); left=$((left - n))
  if [ "${#pids[@]}" -ge "$jobs" ]; then wait "${pids[0]}" || failed=1; pids=("${pids[@]:1}"); fi
done
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
[ $failed -eq 0 ] && echo "fuzz $kind: $total $unit from seed $first, all passed" || echo "fuzz $kind: some seeds failed (fuzz-logs/)"
exit $failed
