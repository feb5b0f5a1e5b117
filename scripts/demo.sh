#!/usr/bin/env bash
# Install what is needed, then run the local demo network and its walk-through.
# Extra arguments go to `p2pgrid demo`, e.g.: bash scripts/demo.sh --keep-running
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/p2pgrid demo "$@"
