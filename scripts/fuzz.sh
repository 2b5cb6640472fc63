#!/usr/bin/env bash
# Fuzz every codec and socket-facing parser with atheris (tests/fuzz/).
#   scripts/fuzz.sh [RUNS] [TARGET...]     default: 100000 runs, all targets
# Findings (crash, unexpected exception, >10 s per input, >1 GiB RSS) are left
# in fuzz-artifacts/; fix them and keep the input in tests/fuzz/regressions/TARGET/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${1:-100000}
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  mapfile -t TARGETS < <($PY -c 'from tests.fuzz.targets import NAMES; print("\n".join(NAMES))')
fi
mkdir -p fuzz-artifacts
status=0
for t in "${TARGETS[@]}"; do
  work=$(mktemp -d "/tmp/fuzz-$t-XXXX")
  if PYTHONPATH=. $PY -m tests.fuzz.run "$t" --runs="$RUNS" --work="$work" \
       --artifacts=fuzz-artifacts >"$work.log" 2>&1; then
    echo "$t: $(grep -o 'number_of_executed_units: [0-9]*' "$work.log" | cut -d' ' -f2) inputs, ok"
  else
    echo "$t: FAILED, see $work.log and fuzz-artifacts/"; status=1
  fi
  rm -rf "$work"
done
exit $status
