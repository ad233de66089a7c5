#!/usr/bin/env bash
# Wheels for the packages a lent GPU machine lacks, built HERE (it has no network) for ITS Python:
#   bash benchmarks/build_wheels.sh            # -> .whl/ (git-ignored, ~7 MB), then verifies the set
# benchmarks/gpu.sh installs from .whl/ what that machine is missing (benchmarks/install_wheels.py);
# the device call names .whl in `carry` (benchmarks/README.md has the exact call).
#
# The device image (Python 3.12, torch, timm, accelerate, numpy, pyyaml, tqdm, psutil, ninja, msgpack,
# einops, py-cpuinfo) lacks deepspeed and webdataset and their small dependencies; pytest may be missing
# too. Every wheel is downloaded as a binary for the device's Python (`--python-version 3.12 --abi cp312`,
# manylinux x86_64), so a compiled one (pydantic-core) matches its interpreter, not this machine's.
# DeepSpeed ships only an sdist: it is built here as a pure-Python wheel (no compiled ops: DS_BUILD_OPS=0;
# its build imports torch, so this needs a Python with torch: the project's .venv) and JIT-builds any
# op it needs at run time (our runs use torch's optimizer and need none).
#
# Knobs: PY (python with pip and torch; default .venv/bin/python), DEST (default .whl), PYVER (3.12),
# PY_CHECK (a local python of version PYVER to import-test the wheels with; found via pyenv if unset).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEST=${DEST:-.whl}
PYVER=${PYVER:-3.12}
ABI=cp${PYVER/./}

# Versions: the ones this stack is tested with (README "Tested versions"); one version of each.
PIP_BINARY=(
  webdataset==1.0.2 braceexpand==0.1.7
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  pytest==9.2.0 pytest-timeout==2.4.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0
)
DEEPSPEED=deepspeed==0.19.8
# What the device image already has, at least as new as these wheels need (stubbed in the check below).
DEVICE_HAS=(torch==2.11.0 numpy==2.5.2 pyyaml==6.0.2 tqdm==4.67.1 psutil==7.0.0 ninja==1.13.0 msgpack==1.1.0
            einops==0.8.1 py-cpuinfo==9.0.0)
PLATFORMS=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${p}_x86_64")
done
TARGET=(--python-version "$PYVER" --implementation cp --abi "$ABI" "${PLATFORMS[@]}" --only-binary=:all:)

rm -rf "$DEST"
mkdir -p "$DEST"
echo "== binary wheels for CPython $PYVER manylinux x86_64 -> $DEST"
"$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$DEST" "${PIP_BINARY[@]}"
echo "== $DEEPSPEED: sdist -> pure-Python wheel (no compiled ops)"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$DEEPSPEED"

# Every wheel must be pure Python or built for the device's interpreter.
bad=$(cd "$DEST" && ls -1 ./*.whl | grep -vE -- "-(py3|py2\.py3)-none-any\.whl$|-$ABI-($ABI|abi3)-[a-z0-9_.]*x86_64\.whl$" || true)
if [ -n "$bad" ]; then
  echo "build_wheels.sh: not pure and not for $ABI manylinux x86_64: $bad" >&2
  exit 1
fi

echo "== check: the set (plus stubs of what the device has) resolves for Python $PYVER without an index"
STUBS=$(mktemp -d)
trap 'rm -rf "$STUBS"' EXIT
"$PY" - "$STUBS" "${DEVICE_HAS[@]}" <<'EOF'
# Empty wheels named like the device's own packages: the resolver sees them as available, nothing more.
import sys, zipfile
out = sys.argv[1]
for spec in sys.argv[2:]:
    name, version = spec.split("==")
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(f"{out}/{dist}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
EOF
"$PY" -m pip install -q --dry-run --ignore-installed --no-index --find-links "$DEST" --find-links "$STUBS" \
  "${TARGET[@]}" --target "$STUBS/site" --report "$STUBS/report.json" deepspeed webdataset pytest pytest-timeout
"$PY" - "$STUBS/report.json" "$DEST" <<'EOF'
# Every carried wheel is used by the resolution (no stray second version), and each of the four resolved.
import json, os, sys
report, dest = json.load(open(sys.argv[1])), sys.argv[2]
chosen = {os.path.basename(i["download_info"]["url"]) for i in report["install"]}
carried = set(os.listdir(dest))
unused = sorted(carried - chosen)
if unused:
    sys.exit(f"build_wheels.sh: carried but not needed by the resolution: {unused}")
print(f"resolves: {len(chosen)} distributions, {len(carried)} of them carried")
EOF

if [ -z "${PY_CHECK:-}" ] && command -v pyenv >/dev/null; then
  v=$(pyenv versions --bare | grep -E "^${PYVER//./\\.}(\.|$)" | tail -1 || true)
  [ -n "$v" ] && PY_CHECK="$(pyenv root)/versions/$v/bin/python"
fi
if [ -n "${PY_CHECK:-}" ]; then
  echo "== check: install and import under $("$PY_CHECK" --version) (no torch here: deepspeed and webdataset not imported)"
  PIP_ROOT_USER_ACTION=ignore "$PY_CHECK" -m pip install -q --no-index --no-deps --no-compile --target "$STUBS/py" "$DEST"/*.whl
  PYTHONPATH="$STUBS/py" "$PY_CHECK" -c "import pydantic, pydantic_core, hjson, braceexpand, pytest, pytest_timeout
print('imports ok: pydantic', pydantic.VERSION, 'pydantic_core', pydantic_core.__version__, 'pytest', pytest.__version__)"
else
  echo "(no local Python $PYVER: import check skipped; set PY_CHECK to run it)"
fi
echo "== $DEST: $(ls "$DEST" | wc -l) wheels, $(du -sh "$DEST" | cut -f1)"
ls -1 "$DEST"
