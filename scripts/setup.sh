#!/usr/bin/env bash
# Create .venv with everything TensorTrim needs, from nothing. torch goes first
# and pinned: a looser requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Debian's Chromium drives the browser tests (Playwright cannot download one here).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: chromium is missing; install it (apt-get install chromium) for the browser tests" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "torch==2.13.0"
# bench: the quality benchmark's baselines, which its test runs for real
.venv/bin/pip install -q -e ".[dev,bench]"
