#!/usr/bin/env bash
# Download (once) the aarch64 wheels of the device runtime into WHEELS, from the host, without emulation.
# Usage: devices/qemu/wheels.sh WHEELS
set -euo pipefail
wheels="${1:?usage: wheels.sh WHEELS}"
here="$(cd "$(dirname "$0")" && pwd)"
pip=(python3 -m pip)
[[ -n "${EDGELEARN_HOST_PYTHON:-}" ]] && pip=("$EDGELEARN_HOST_PYTHON" -m pip)
lock="$here/requirements-aarch64.txt"
sdist="$here/requirements-aarch64-sdist.txt"
stamp="$wheels/.edgelearn-wheels-$(cat "$lock" "$sdist" | sha256sum | cut -c1-16)"

if [[ -f "$stamp" ]]; then
  echo "wheels: cached in $wheels"
  exit 0
fi
mkdir -p "$wheels"
source "$here/platforms.sh"
# shellcheck disable=SC2086  # AARCH64_PIP_OPTS is a list of options
"${pip[@]}" download --quiet --no-deps $AARCH64_PIP_OPTS --dest "$wheels" -r "$lock"
"${pip[@]}" wheel --quiet --no-deps --wheel-dir "$wheels" -r "$sdist"
touch "$stamp"
echo "wheels: $(ls "$wheels"/*.whl | wc -l) wheels, $(du -sh "$wheels" | cut -f1) in $wheels"
