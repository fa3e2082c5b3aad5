#!/usr/bin/env bash
# Before you push or stop: run CI's exact command on a fresh clone of what is committed, in a temporary folder.
# A green run in your own tree can hide a missing install step, an untracked file or a version that moved.
#   bash packaging/clean-clone-check.sh [pytest args...]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d -t finetune-studio-ci-XXXXXX)"
trap 'rm -rf "$tmp"' EXIT
git clone -q "$repo" "$tmp/finetune-studio"
cd "$tmp/finetune-studio"
echo "CI on a fresh clone of $(git rev-parse --short HEAD) in $tmp" >&2
CI=true bash .ci/run "$@"
