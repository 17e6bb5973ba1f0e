#!/usr/bin/env bash
# One-command install for a fresh machine: torch (CPU build unless a GPU or an existing torch is found),
# the project with its dev extras (editable), and the proto linter (npm @bufbuild/buf).
#   TORCH_SPEC   pip requirement for torch when none is installed (default: torch==2.13.0 on CPU hosts,
#                torch on GPU hosts)
#   PYTHON       interpreter to install into (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

echo "[install] python: $($PY --version 2>&1)"
if $PY -c "import torch" 2>/dev/null; then
    echo "[install] torch already present: $($PY -c 'import torch; print(torch.__version__)')"
else
    if command -v nvidia-smi >/dev/null 2>&1; then default_torch="torch"; else default_torch="torch==2.13.0"; fi
    spec=${TORCH_SPEC:-$default_torch}
    echo "[install] installing $spec"
    $PY -m pip install --progress-bar off "$spec"
fi

echo "[install] installing the project (editable) with dev extras"
$PY -m pip install --progress-bar off -e ".[dev]"

if command -v npm >/dev/null 2>&1; then
    echo "[install] installing buf (npm @bufbuild/buf) for proto lint"
    npm ci --no-audit --no-fund --loglevel=error
else
    echo "[install] npm not found: skipping buf (proto lint only; tests do not need it)" >&2
fi
echo "[install] done"
