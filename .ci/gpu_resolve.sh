#!/usr/bin/env bash
# Does the README's GPU install resolve on Colab's Pythons (3.12 and 3.13)?
#   pip install -c requirements/constraints.txt -e ".[gpu]"
# For each interpreter: pip's resolver dry run of exactly that command, one summary line (the
# resolved torch / vllm / bitsandbytes / transformers / trl / fastapi / numpy and the seconds it
# dry run took), exit status non-zero when any does not resolve. Nothing is installed: throwaway venvs and
# a copy of the project's packaging files (pip writes tunekit.egg-info next to pyproject.toml) live
# in a mktemp -d folder, removed at the end. PyPI serves wheel metadata (PEP 658), so pip does not
# download the torch / vllm wheels. GPU_RESOLVE_PYTHONS="3.12 3.13" picks the interpreters.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
versions="${GPU_RESOLVE_PYTHONS:-3.12 3.13}"
pyenv_root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"

# The newest pyenv build of Python $1 (e.g. 3.12 -> .../versions/3.12.1/bin/python3.12), else
# python$1 on PATH if it runs; empty when there is none.
find_python() {
    local v="$1" p
    p="$(ls -d "$pyenv_root"/versions/"$v".*/bin/python"$v" 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -z "$p" ] && command -v "python$v" >/dev/null 2>&1; then p="$(command -v "python$v")"; fi
    if [ -n "$p" ] && "$p" -c 'import sys' >/dev/null 2>&1; then echo "$p"; fi
}

declare -A interp
missing=0
for v in $versions; do
    interp[$v]="$(find_python "$v")"
    if [ -z "${interp[$v]}" ]; then
        echo "gpu-resolve: no Python $v interpreter (looked for $pyenv_root/versions/$v.*/bin/python$v and python$v on PATH); install it, e.g. pyenv install $v" >&2
        missing=1
    fi
done
[ "$missing" -eq 0 ] || exit 2

tmp="$(mktemp -d "${TMPDIR:-/tmp}/gpu-resolve.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# What pip needs to build tunekit's metadata: pyproject.toml, the README it names, the packages (configs/ ships as tunekit.examples).
mkdir "$tmp/src"
(cd "$repo" && tar -c --exclude=build --exclude='*.egg-info' --exclude=__pycache__ \
    pyproject.toml README.md requirements tunekit data_prep train serve configs) | tar -x -C "$tmp/src"

failed=0
for v in $versions; do
    py="${interp[$v]}"
    venv="$tmp/venv$v"
    report="$tmp/report$v.json"
    log="$tmp/pip$v.log"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
    rc=0
    start="$(date +%s)"
    (cd "$tmp/src" && "$venv/bin/python" -m pip install --dry-run --ignore-installed --quiet \
        --report "$report" -c requirements/constraints.txt -e ".[gpu]") >>"$log" 2>&1 || rc=$?
    secs=$(( $(date +%s) - start ))
    full="$("$venv/bin/python" -c 'import platform; print(platform.python_version())')"
    if [ "$rc" -ne 0 ] || [ ! -s "$report" ]; then
        echo "python $full: DOES NOT RESOLVE (pip exit $rc, ${secs} s); pip said:"
        grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 25 | sed 's/^/    /'
        failed=1
        continue
    fi
    "$venv/bin/python" - "$report" "$full" "$secs" <<'EOF' || failed=1
import json, sys
report, full, secs = sys.argv[1:]
got = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
       for i in json.load(open(report))["install"]}
names = ["torch", "vllm", "bitsandbytes", "transformers", "trl", "peft", "fastapi", "numpy"]
absent = [n for n in names if n not in got]
line = " ".join(f"{n}={got.get(n, 'MISSING')}" for n in names)
print(f"python {full}: {'OK' if not absent else 'INCOMPLETE'} {line} ({len(got)} packages, {secs} s)")
sys.exit(1 if absent else 0)
EOF
done

if [ "$failed" -ne 0 ]; then
    echo "gpu-resolve: the GPU install does not resolve on every Python ($versions)" >&2
    exit 1
fi
