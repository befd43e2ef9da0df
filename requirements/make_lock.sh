#!/usr/bin/env bash
# Writes requirements/lock.txt: the exact version of every package (transitive ones included) that
# `make demo`, `make test` and CI install, resolved today from setup.py's loose requirements in a clean
# venv. Run by `make lock`; then run `make test-latest` (the same suite on the newest allowed releases,
# which is what the lock was just resolved to) and commit the lock only if it passes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev,compare,deepspeed,real}
OUT=requirements/lock.txt
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PY" -m venv "$work/venv"
bin="$work/venv/bin"
"$bin/python" -m pip install -q --upgrade pip "setuptools>=64" wheel cmake numpy
"$bin/python" -m pip install -q "$TORCH_PIN"
# the project from a copy of its files (not editable: nothing is written into this checkout)
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | "$PY" -c '
import os, shutil, sys
for path in filter(os.path.isfile, sys.stdin.read().split("\0")):
    os.makedirs(os.path.dirname(os.path.join(sys.argv[1], path)) or ".", exist_ok=True)
    shutil.copy2(path, os.path.join(sys.argv[1], path))' "$work/src"
"$bin/python" -m pip install -q --no-build-isolation "$work/src[$EXTRAS]" "$TORCH_PIN"

{
  echo "# Exact versions for \`make demo\`, \`make test\` and CI (pip constraints: pip install -c requirements/lock.txt)."
  echo "# Written by \`make lock\` (requirements/make_lock.sh) from a clean venv; do not edit by hand."
  echo "# Resolved $(date -u '+%Y-%m-%d %H:%M UTC') for $("$bin/python" -c 'import platform, sys; print(f"Python {sys.version.split()[0]}, {platform.system()} {platform.machine()}")'), $TORCH_PIN (CPU build), extras [$EXTRAS]."
  echo "# setup.py stays loose; \`make test-latest\` runs the suite on the newest releases it allows."
  # torch's local label (+cpu) is dropped: '==2.13.0' matches the CPU build pip finds on this machine
  "$bin/python" -m pip freeze --all --exclude adaswitch | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
} > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "wrote $OUT ($(grep -vc '^#' "$OUT") packages)"
