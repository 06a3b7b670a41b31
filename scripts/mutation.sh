#!/usr/bin/env bash
# Mutation testing (mutmut 3) of the optimizer, preconditioner, damping, update and quadratic-model
# code, against the test files that exercise them.
#
#   scripts/mutation.sh [REV]     # REV: a commit (default: the working tree, tracked files)
#
# Runs in a scratch copy (mutmut writes mutants/ there), prints the counts per status and writes the
# full list of mutants and statuses to $MUTATION_OUT (default mutation-results.txt in the current
# directory). CPU heavy: MUTATION_CHILDREN workers (default 2) and a time box of MUTATION_TIMEOUT
# (default 45m); mutants not run when the time box ends are reported as "not checked".
# MUTATION_MODULES and MUTATION_TESTS (space-separated paths) replace the default modules and tests
# below, e.g. MUTATION_MODULES=src/torch_kfac/calibration.py MUTATION_TESTS=tests/test_calibration.py.
# MUTATION_WORKDIR=DIR runs in DIR (created, kept afterwards) instead of a temporary copy, so the
# results can be read while it runs and survivors re-run later: `cd DIR && mutmut results`,
# `mutmut show NAME`, `mutmut run NAME...` (with the tests copied in again after changing them).
# Needs `pip install mutmut` (3.x). Report of the last run: benchmarks/results/mutation.md, written by
# scripts/mutation_report.py from the list and the survivors' verdicts (benchmarks/results/mutation-verdicts.tsv);
# of calibration.py, lowrank.py and utils.py: benchmarks/results/mutation-calibration-lowrank-utils.md;
# of losses.py and linalg.py: benchmarks/results/mutation-losses-linalg.md; of last_batch.py:
# benchmarks/results/mutation-last-batch.md; of capture.py and blocks/switched.py:
# benchmarks/results/mutation-capture-switched.md.
set -euo pipefail

MODULES=(
  src/torch_kfac/optimizer.py
  src/torch_kfac/preconditioner.py
  src/torch_kfac/damping.py
  src/torch_kfac/update.py
  src/torch_kfac/qmodel.py
)
TESTS=(
  tests/test_optimizer.py
  tests/test_optimizer_adaptive.py
  tests/test_preconditioner.py
  tests/test_damping.py
  tests/test_update.py
  tests/test_qmodel.py
  tests/test_fisher_types.py
  tests/test_capture.py
)
if [[ -n ${MUTATION_MODULES:-} ]]; then read -r -a MODULES <<<"$MUTATION_MODULES"; fi
if [[ -n ${MUTATION_TESTS:-} ]]; then read -r -a TESTS <<<"$MUTATION_TESTS"; fi
# The Monte Carlo convergence test (16 s) is left out: every fisher_pass mutant it could kill is
# also run against the exact type-2 tests of the same file.
DESELECT=(tests/test_fisher_types.py::test_mc_fisher_converges_to_type2)
REV=${1:-}
OUT=$(realpath -m "${MUTATION_OUT:-mutation-results.txt}")
CHILDREN=${MUTATION_CHILDREN:-2}
TIME_BOX=${MUTATION_TIMEOUT:-45m}

repo=$(git rev-parse --show-toplevel)
if [[ -n ${MUTATION_WORKDIR:-} ]]; then
  work=$(realpath -m "$MUTATION_WORKDIR")
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
if [[ -n $REV ]]; then
  git -C "$repo" archive "$REV" | tar -x -C "$work"
else
  (cd "$repo" && git ls-files -z | xargs -0 cp --parents -t "$work")
fi

{
  echo "[mutmut]"
  echo "source_paths = src"
  echo "only_mutate ="
  printf '    %s\n' "${MODULES[@]}"
  echo "pytest_add_cli_args_test_selection ="
  printf '    %s\n' "${TESTS[@]}"
  echo "pytest_add_cli_args ="
  printf '    %s\n' -p no:cacheprovider -x -q "${DESELECT[@]/#/--deselect=}"
} >"$work/setup.cfg"

cd "$work"
export OMP_NUM_THREADS=1
status=0
timeout "$TIME_BOX" mutmut run --max-children "$CHILDREN" >mutmut.log 2>&1 || status=$?
if [[ $status -ne 0 && $status -ne 124 ]]; then
  tail -20 mutmut.log
  exit "$status"
fi
mutmut results --all true | sed 's/^ *//' >"$OUT"
echo "mutmut over ${MODULES[*]} with ${TESTS[*]} ($([[ $status -eq 124 ]] && echo "stopped at $TIME_BOX" || echo complete)):"
awk -F': ' '{count[$2]++} END {for (s in count) printf "  %-12s %d\n", s, count[s]}' "$OUT" | sort
echo "full list: $OUT"
