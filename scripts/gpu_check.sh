#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py) with the project's venv; about 8 minutes on one GPU.
#   bash scripts/gpu_check.sh                 # on a GPU node (make gpu-check does the same)
#   ACCEL=cpu bash scripts/gpu_check.sh       # the CPU-compatible parts, short runs
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${HASHREC_PYTHON:-.venv/bin/python}"
args=()
if [ "${ACCEL:-auto}" = cpu ]; then args+=(--quick); fi
exec "$PY" scripts/gpu_check.py "${args[@]}" "$@"
