#!/usr/bin/env bash
# Run the fault-injection suite as one command.
#   scripts/chaos.sh [--seed N] [--profile short|long] [--results FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
seed=1; profile=short; results=""
while [ $# -gt 0 ]; do
  case "$1" in
    --seed) seed="$2"; shift 2;;
    --profile) profile="$2"; shift 2;;
    --results) results="$2"; shift 2;;
    *) echo "usage: $0 [--seed N] [--profile short|long] [--results FILE]" >&2; exit 2;;
  esac
done
py=.venv/bin/python; [ -x "$py" ] || py=python3
export AZOLLA_CHAOS_SEED="$seed" AZOLLA_CHAOS_PROFILE="$profile"
[ -n "$results" ] && export AZOLLA_CHAOS_RESULTS="$results"
exec "$py" -m pytest tests/chaos -s -q -p no:cacheprovider
