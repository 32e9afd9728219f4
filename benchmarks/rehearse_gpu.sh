#!/usr/bin/env bash
# The CPU rehearsal of benchmarks/run_gpu.sh: the same script, steps and files (`--device cpu`), in a fresh
# virtual environment that holds what the device image holds, as far as this machine can: torch, the
# image's package list (KINDS.md of the device tool, read 2026-11-17; versions pinned where it gives
# them) and the shared wheel set, downloaded for THIS Python (gpu-wheels.sh fetches cp312 wheels).
# Run from the project root:
#   bash benchmarks/rehearse_gpu.sh [DIR]      # DIR default /tmp/ktl-gpu-rehearsal (outside the repo)
# It leaves DIR/venv, DIR/whl (the wheels), DIR/site (their install) and DIR/out (what $OUT would hold).
# The venv is built once and reused (delete DIR to rebuild); each run starts from an empty DIR/site and
# DIR/out. Set OMP_NUM_THREADS=1 on a shared machine.
#
# Differences from the image, known: Python 3.11 here (3.12 there) and the CPU build of torch 2.13.0
# (2.11.0+cu130 there), so numpy 2.4 (2.5 needs 3.12) and no torchvision/torchaudio (no CPU build here); the
# CUDA-only packages (cuda-*, cupy-cuda13x, jax-cuda13-*, numba-cuda, nvidia-* but nvidia-ml-py) and
# mpi4py (no wheel; needs MPI to build) are left out. pip prints what else it added: compare with
# `DIR/venv/bin/python -m pip list` (on 2026-12-04: mpmath, tzdata, which the list must have omitted).
set -euo pipefail
DIR=${1:-/tmp/ktl-gpu-rehearsal}
VENV=$DIR/venv
mkdir -p "$DIR"

IMAGE_PINNED=(accelerate==1.15.0 huggingface-hub==1.33.0 safetensors==0.8.0 tokenizers==0.23.2
  torchmetrics==1.9.0 transformers==5.17.0)
IMAGE_OTHERS=(absl-py aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
  certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cycler cython diffrax
  e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch
  grpcio h11 h5py hf-xet httpcore httpx humanize hypothesis idna imageio iniconfig interface-meta jax jaxlib
  jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
  llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes msgpack multidict
  multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numpy numpyro nvidia-ml-py onnx
  onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
  orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
  propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
  pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
  pytorch-lightning pyyaml regex requests rich sacrebleu scikit-build-core scikit-image scikit-learn scipy
  seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
  statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken
  timm toolz torchaudio torchdiffeq torch-geometric torchvision tqdm treescope triton typer
  typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp)

if [ ! -x "$VENV/bin/python" ] || [ ! -e "$VENV/.image-packages" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q torch==2.13.0  # the CPU wheel on disk where there is one
  "$VENV/bin/python" -m pip install -q torch==2.13.0 "${IMAGE_PINNED[@]}" "${IMAGE_OTHERS[@]}"
  # The newest typer needs pydantic, which the image lacks (its typer is older): out again, so that the
  # rehearsal finds pydantic only where the device run does, in the wheel set.
  "$VENV/bin/python" -m pip uninstall -q -y pydantic pydantic-core annotated-types typing-inspection
  # PyPI's torchvision/torchaudio are CUDA builds (libtorch_cuda.so): beside the CPU torch their ops fail to
  # load and transformers' vision models die at import. The image's match its torch; here: none at all.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio
  touch "$VENV/.image-packages"
fi
# The shared wheel set (../shared/tools/gpu-wheels.sh's names), for this Python.
rm -rf "$DIR/whl" && mkdir -p "$DIR/whl"
quiet() { "$@" 2> >(grep -v '^WARNING: Location' >&2); }  # pip's note on each index folder it skips
quiet "$VENV/bin/python" -m pip download -q --only-binary=:all: -d "$DIR/whl" pydantic pydantic-settings
quiet "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$DIR/whl" diffusers fastapi \
  starlette uvicorn python-multipart opentelemetry-api
rm -rf "$DIR/site" "$DIR/out"
PATH=$VENV/bin:$PATH PYTHON=$VENV/bin/python WHEELS=$DIR/whl SITE=$DIR/site OUT=$DIR/out \
  bash benchmarks/run_gpu.sh --device cpu
