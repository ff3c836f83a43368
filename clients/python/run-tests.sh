#!/usr/bin/env bash
# Installs the Python client with its test, torch, flax and keras extras (plus transformers and
# torchvision for the recipe tests) into the repo's .venv (created if
# missing) and runs its tests against the real server binary:
#
#   clients/python/run-tests.sh [PYTEST_ARGS...]
#
# The binary is $WEIGHTINIT_BIN, default target/release/weightinit (build it first with
# `cargo build --release`). Safe to run again: an existing .venv and its packages are reused.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=$(realpath -m "${WEIGHTINIT_BIN:-$repo/target/release/weightinit}")
cd "$repo"

[ -x .venv/bin/python ] || python3 -m venv .venv
# The frameworks at the versions the integrations and recipes were checked against.
.venv/bin/python -m pip install --quiet --progress-bar off "./clients/python[test,torch,flax,keras]" \
  torch==2.15.0 torchvision==0.29.2 transformers==5.24.0 jax==0.10.2 flax==0.12.8 keras==3.15.1

WEIGHTINIT_BIN=$bin exec .venv/bin/python -m pytest clients/python/tests "$@"
