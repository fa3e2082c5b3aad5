#!/usr/bin/env bash
# mypy over the installed namespace. mypy cannot follow setuptools' editable mapping (finetune_studio.core -> core/),
# so it reads the code through a folder of links laid out as the installed package (kept in .venv/, with mypy's cache).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
tree="$root/.venv/mypy-tree"
mkdir -p "$tree/finetune_studio"
for pkg in core engine kernels studio; do ln -sfn "$root/$pkg" "$tree/finetune_studio/$pkg"; done
cd "$tree"
exec "$root/.venv/bin/python" -m mypy --config-file "$root/pyproject.toml" --python-executable "$root/.venv/bin/python" \
  -p finetune_studio "$@"
