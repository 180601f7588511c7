#!/usr/bin/env bash
# Installs what a fresh clone is missing: a .venv with torch 2.14.1 / torchvision 0.29.1 and
# this package (with test extras), and Debian's Fashion-MNIST when it is absent. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision, zmq, msgpack, yaml, tqdm, sklearn, pytest" 2>/dev/null \
   || ! .venv/bin/python -c "import pipeline" 2>/dev/null; then
    .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
fi
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null \
        || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
        || echo "warning: could not install dataset-fashion-mnist; set data_dir to a folder with the Fashion-MNIST idx files" >&2
fi
