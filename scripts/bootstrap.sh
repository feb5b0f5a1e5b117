#!/usr/bin/env bash
# Create .venv and install p2pgrid with its test tools. Idempotent: re-runs only
# when pyproject.toml or constraints.txt changed. torch is pinned to the CPU build: an unpinned torch
# would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv" >&2
  "$PY" -m venv .venv
fi
# The console's browser test drives Debian's headless chromium (tests skip it without).
if { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; } \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # --no-install-recommends: chromium's recommends pull avahi, samba, cups and more
  echo "== installing chromium and chromium-driver for the browser test, with apt-get" \
       "install --no-install-recommends (set P2PGRID_NO_CHROMIUM=1 to skip)" >&2
  { [ -z "${P2PGRID_NO_CHROMIUM:-}" ] && apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver; } >&2 || echo "== chromium not installed; browser tests will skip" >&2
fi
# The network lab (scripts/lab.py, tests/lab) emulates delay and loss with Debian's vde tools
# where the kernel has no netem; it needs root and iproute2 (lab tests skip without root).
if { ! command -v wirefilter >/dev/null || ! command -v tc >/dev/null; } \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "== installing iproute2, vdeplug and vde-wirefilter (network lab)" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      iproute2 vdeplug vde-wirefilter; } >&2 || echo "== vde tools not installed; delayed lab links will fail" >&2
fi
stamp=.venv/.p2pgrid-installed
# setup.py and the C kernels it builds (active SMPC) count too: a changed kernel is rebuilt
want=$(cat pyproject.toml constraints.txt setup.py protocols/smpc/_ring128.c | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "== installing dependencies (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q "torch==2.13.0" >&2 \
    || .venv/bin/python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu >&2
  # constraints.txt: the exact versions CI tests (the patched transport libraries above all)
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]" >&2
  echo "$want" > "$stamp"
fi
