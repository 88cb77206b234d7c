#!/usr/bin/env bash
# Sets up a fresh machine (Python 3.11 + pip) and runs the whole method on the embedded toy config.
#   bash launch/run_toy.sh [workdir]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e .
humpback pipeline --config=configs/toy.py --workdir="${1:-runs/toy}"
