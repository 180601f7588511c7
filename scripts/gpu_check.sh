#!/usr/bin/env bash
# The prepared GPU check: tests/gpu/ (pytest), then bench/gpu_check.py, which runs every CUDA path once
# on one GPU (several stages share it) and prints one table. About 6 minutes; it stops itself at 8.
#   scripts/gpu_check.sh            on a machine with a GPU (after ./scripts/setup.sh)
#   scripts/gpu_check.sh --dry-run  the CPU half of every check, on any machine (CI runs it)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
dry=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) dry="--dry-run" ;;
        -h|--help) sed -n '2,5p' "$0"; exit 0 ;;
        *) echo "error: unknown argument '$arg'; usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
    esac
done
suite="not run (dry run: CI runs tests/gpu, where it skips without a GPU)"
if [ -z "$dry" ]; then
    suite=$(timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -n 1)
fi
limit=330; [ -n "$dry" ] && limit=900  # 8 minutes in all on a GPU; a loaded 2-core CPU needs longer
exec timeout "$limit" "$PY" bench/gpu_check.py $dry --suite "$suite"
