#!/usr/bin/env bash
# Builds the Python client's wheel once (scripts/wheel), checks that it installs and runs
# where there is no Rust, installs it with its test, torch, flax and keras extras (plus the
# frameworks the own-init tests use: timm, PEFT, torchtitan) into the repo's .venv (created
# if missing) and runs its tests against the real server binary:
#
#   clients/python/run-tests.sh [PYTEST_ARGS...]
#
# The binary is $WEIGHTINIT_BIN, default target/release/weightinit (build it first with
# `cargo build --release`). Safe to run again: an existing .venv and its packages are reused.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=$(realpath -m "${WEIGHTINIT_BIN:-$repo/target/release/weightinit}")
cd "$repo"

# One build serves the tests and the check below.
wheel=$(scripts/wheel | tail -n 1)

# The wheel on a machine without Rust: a fresh venv of the system's Python, nothing but
# /usr/bin and /bin on the PATH (no cargo, no rustc), only binary packages; then the README's
# NumPy snippet with target "local".
fresh=$(mktemp -d)
trap 'rm -rf "$fresh"' EXIT
/usr/bin/python3 -m venv "$fresh/venv"
bare=(env -i HOME="$HOME" PATH="$fresh/venv/bin:/usr/bin:/bin")
if "${bare[@]}" sh -c 'command -v cargo || command -v rustc'; then
  echo "run-tests.sh: the wheel check needs a PATH without cargo and rustc" >&2
  exit 1
fi
"${bare[@]}" pip install --quiet --disable-pip-version-check --only-binary :all: "$wheel"
snippet=$("$fresh/venv/bin/python" - <<'EOF'
import re
from pathlib import Path

section = Path("README.md").read_text().split("\n## Python", 1)[1]
code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
assert '"localhost:50051"' in code, f"README's first Python snippet changed:\n{code}"
print(code.replace('"localhost:50051"', '"local"'))
EOF
)
"${bare[@]}" python -c "$snippet
assert arrays['w'].shape == (256, 784) and arrays['w'].dtype == 'float32', arrays
print('the wheel runs the README snippet without Rust')"

[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --progress-bar off --disable-pip-version-check)
# The frameworks at the versions the integrations and own-init tests were checked against.
"${pip[@]}" "$wheel[test,torch,flax,keras]" \
  torch==2.15.0 torchvision==0.29.2 transformers==5.24.0 jax==0.10.2 flax==0.12.8 keras==3.15.1 \
  timm==1.0.31 peft==0.21.2 tyro==1.0.17 docstring_parser==0.18.0 spmd_types==0.2.3
# torchtitan's own requirements would move the pins above; it needs only those listed.
"${pip[@]}" --no-deps torchtitan==0.3.0
# Every build is version 0.1.0: without --force-reinstall pip keeps an older one.
"${pip[@]}" --force-reinstall --no-deps "$wheel"

WEIGHTINIT_BIN=$bin exec .venv/bin/python -m pytest clients/python/tests "$@"
