#!/usr/bin/env bash
# Mutation testing of the pure domain (src/azolla/domain) with mutmut 3, time-boxed.
#
# Usage: bash scripts/mutation.sh [--resume]
#   --resume   keep ./mutants and its cached verdicts (mutmut re-tests only what changed);
#              by default every run starts from scratch, so the score matches the tree.
# Environment:
#   MUTATION_TIMEOUT           seconds before the run is stopped (default 1500)
#   MUTATION_MIN_SCORE         exit 1 when killed/total (percent) is below it (default 85)
#   AZOLLA_STATEFUL_EXAMPLES   examples of the lifecycle state machine per mutant (default 30;
#                              the normal test run uses 200)
#   PYTHON                     interpreter with mutmut installed (default .venv/bin/python)
#
# Configuration is in pyproject.toml [tool.mutmut]; results and the method are in
# docs/quality.md. Survivors: `mutmut results`, then `mutmut show <name>`.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-.venv/bin/python}"
TIMEOUT="${MUTATION_TIMEOUT:-1500}"
MIN_SCORE="${MUTATION_MIN_SCORE:-85}"
export AZOLLA_STATEFUL_EXAMPLES="${AZOLLA_STATEFUL_EXAMPLES:-30}"

if [ "${1:-}" != "--resume" ]; then
  rm -rf mutants
fi

start=$SECONDS
started_at="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
# mutmut draws a progress spinner on stdout; keep only its final line in the log.
log="$(mktemp)"
timeout --kill-after=30 "$TIMEOUT" "$PY" -m mutmut run >"$log" 2>&1
rc=$?
duration=$((SECONDS - start))
tr '\r' '\n' <"$log" | grep -v '^\s*$' | tail -n 3
rm -f "$log"
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "mutmut stopped after ${TIMEOUT}s (partial results below; rerun with --resume)" >&2
elif [ "$rc" -ne 0 ]; then
  echo "mutmut run failed with exit code $rc" >&2
  exit "$rc"
fi

"$PY" -m mutmut export-cicd-stats >/dev/null
"$PY" - "$started_at" "$duration" "$MIN_SCORE" <<'EOF'
import json
import sys

started_at, duration, min_score = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with open("mutants/mutmut-cicd-stats.json") as f:
    s = json.load(f)
total = s["total"]
killed = s["killed"] + s["timeout"]  # a mutant that hangs the tests is detected too
score = 100.0 * killed / total if total else 0.0
print(f"mutation score: {killed}/{total} killed = {score:.1f}% (incl. {s['timeout']} by timeout)  "
      f"(survived {s['survived']}, no tests {s['no_tests']}, suspicious {s['suspicious']}, "
      f"skipped {s['skipped']}, not run {total - sum(v for k, v in s.items() if k != 'total')})")
print(f"started {started_at}, took {duration} s")
sys.exit(0 if score >= min_score else 1)
EOF
score_rc=$?
echo
echo "Surviving mutants (inspect with: $PY -m mutmut show <name>):"
"$PY" -m mutmut results 2>/dev/null | grep -v ': killed' || true
exit "$score_rc"
