#!/usr/bin/env bash
# Install what is needed, then run the whole test suite (unit, property, multi-peer).
# Extra arguments go to pytest, e.g.: bash scripts/test.sh -k network -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=10 \
  --doctest-modules p2pgrid tests "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "no tests were collected: that is a failure" >&2
  exit 1
fi
exit "$code"
