#!/usr/bin/env bash
# Create .venv (if missing) and install dfkd with its test extras into it.
# Usage: bash scripts/setup.sh        (idempotent; re-running only checks what is installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  # CUDA builds that also run on CPU; on aarch64 the CPU builds of an older release.
  case "$(uname -m)" in
    aarch64|arm64) .venv/bin/pip install -q "torch==2.9.1" "torchvision==0.24.1" ;;
    *) .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1" ;;
  esac
fi
.venv/bin/pip install -q -e ".[test]"
echo "dfkd installed in .venv (activate with: . .venv/bin/activate)"
