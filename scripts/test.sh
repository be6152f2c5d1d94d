#!/usr/bin/env bash
# Run every check the project must pass: lint, types, generated code, the whole test suite
# (real PostgreSQL, real gRPC, real processes) and the strict docs build.
#
# Usage: bash scripts/test.sh        (from anywhere; uses .venv/bin/python, or $PYTHON)
# All steps run; the script exits non-zero if any of them failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY="${PYTHON:-.venv/bin/python}"
if ! [ -x "$PY" ] && ! command -v "$PY" >/dev/null 2>&1; then
  echo "error: $PY not found; create the venv first: python3 -m venv .venv &&" \
       ".venv/bin/pip install -e '.[dev]' (or run: bash .ci/run)" >&2
  exit 2
fi

failed=()
step() {
  local name="$1"
  shift
  printf '\n==> %s\n' "$name"
  local start=$SECONDS
  "$@"
  local rc=$?
  if [ "$rc" -eq 0 ]; then
    printf '<== %s: ok (%ss)\n' "$name" "$((SECONDS - start))"
  else
    printf '<== %s: FAILED with exit code %s (%ss)\n' "$name" "$rc" "$((SECONDS - start))"
    failed+=("$name")
  fi
}

run_pytest() {
  # Per-test timeouts come from pyproject.toml; this outer bound only guards against a wedge.
  timeout --kill-after=60 3000 "$PY" -m pytest -q
  local rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: the suite must not be empty" >&2
  fi
  return "$rc"
}

step "ruff check" "$PY" -m ruff check src tests
step "mypy --strict src" "$PY" -m mypy --strict src
step "generated protobuf code is fresh" "$PY" scripts/gen_proto.py --check
step "pytest" run_pytest
step "mkdocs build --strict" env NO_MKDOCS_2_WARNING=1 "$PY" -m mkdocs build --strict --quiet

echo
if [ "${#failed[@]}" -ne 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "All checks passed."
