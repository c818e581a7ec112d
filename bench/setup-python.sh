#!/usr/bin/env bash
# Creates the Python venv used by bench/compare.py (dlt and the Singer SDK)
# at target/bench-venv under the repository root, installs
# bench/requirements.txt into it, and prints the path of the venv's python.
# Idempotent: an existing venv is reused, and pip runs only when
# requirements.txt differs from what was last installed into it.
# Progress goes to stderr; stdout is only the python path, so callers can do
#   PY=$(bench/setup-python.sh)
# PYTHON picks the interpreter for a new venv (default python3; dlt 1.31 and
# singer-sdk 0.54 need Python >= 3.10). The two packages share one venv:
# pip check is clean, and singer-sdk changes none of the versions dlt's own
# dependencies resolve to (requests uses simplejson in both cases, as dlt
# itself depends on it).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/target/bench-venv"
reqs="$root/bench/requirements.txt"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    echo "creating $venv" >&2
    "$python" -m venv "$venv"
fi

# Skip pip when the pinned requirements are already satisfied (a stamp
# holding a copy of the requirements that were last installed).
stamp="$venv/.requirements.installed"
if ! cmp -s "$reqs" "$stamp"; then
    echo "installing $reqs" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$reqs" >&2
    cp "$reqs" "$stamp"
fi

echo "$venv/bin/python"
