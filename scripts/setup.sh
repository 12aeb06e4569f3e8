#!/usr/bin/env bash
# Create .venv with everything ControlNet++ needs. Idempotent: a second run with everything
# present only checks and finishes in well under a minute.
#
#   bash scripts/setup.sh                          # everything (the test command runs this)
#   bash scripts/setup.sh --without-segmentation   # all but mmcv's 15-minute build: every task but
#                                                  # ADE20K / COCO-Stuff (the quickstart's path)
#
# Environment:
#   VENV=path                     where the virtual environment lives (default: <repo>/.venv)
#   PYTHON=python3.11             interpreter used to create it
#   TORCH_SPEC="torch==X ..."     what to pip-install when the venv has no torch yet
#                                 (default: torch==2.14.1 torchvision==0.29.1). A torch that is
#                                 already importable in the venv is never replaced: on a GPU node,
#                                 install your CUDA build first (or set TORCH_SPEC to it, with your
#                                 wheel index as --index-url) and setup keeps it.
#   SYSTEM_SITE_PACKAGES=1        create the venv with --system-site-packages, to reuse a CUDA
#                                 torch installed system-wide or by a cluster module.
#   MMCV_WHEEL_CACHE=dir          where the mmcv wheel built here is kept for the next run
#                                 (default: ~/.cache/controlnetpp/wheels, outside the repo).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3.11}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
MMCV_VERSION=2.1.0
MMCV_WHEEL_CACHE=${MMCV_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/controlnetpp/wheels}
START=$(date +%s)
SEGMENTATION=1
for arg in "$@"; do
  case $arg in
    --without-segmentation) SEGMENTATION=0 ;;
    *) echo "setup: unknown argument $arg (known: --without-segmentation)" >&2; exit 2 ;;
  esac
done

log() { printf '[setup %3ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }

# ---------------------------------------------------------------------------------------------
# 1. The virtual environment.
if [[ ! -x "$VENV/bin/python" ]]; then
  command -v "$PYTHON" >/dev/null || PYTHON=python3
  "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null \
    || { echo "setup: needs Python 3.11 ($PYTHON is $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2; exit 1; }
  log "creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv ${SYSTEM_SITE_PACKAGES:+--system-site-packages} "$VENV"
else
  log "using existing $VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

# ---------------------------------------------------------------------------------------------
# 2. torch: keep whatever torch is already there (a user's CUDA build), else install TORCH_SPEC.
if "$PY" -c 'from importlib.metadata import version; version("torch"); version("torchvision")' 2>/dev/null; then
  log "keeping torch $("$PY" -c 'from importlib.metadata import version; print(version("torch"))')"
else
  log "installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  "${PIP[@]}" install $TORCH_SPEC
fi
# Every later install is constrained to this torch, so no dependency can silently swap it
# for another build (pip happily downgrades torch to satisfy an unrelated pin).
CONSTRAINTS="$VENV/torch-constraints.txt"
"$PY" - > "$CONSTRAINTS" <<'EOF'
from importlib.metadata import version
for name in ("torch", "torchvision"):
    print(f"{name}=={version(name)}")
EOF
TORCH_TAG=$("$PY" -c 'from importlib.metadata import version; print(version("torch").replace("+", "_"))')

# ---------------------------------------------------------------------------------------------
# 3. Everything else (before mmcv: a quickstart without segmentation needs only this). A stamp of requirements.txt + the torch pins makes a second run skip pip.
STAMP="$VENV/.requirements.sha256"
WANT=$(cat "$ROOT/requirements.txt" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  log "requirements.txt already installed"
else
  log "installing requirements.txt"
  "${PIP[@]}" install -c "$CONSTRAINTS" -r "$ROOT/requirements.txt"
  echo "$WANT" > "$STAMP"
fi

# ---------------------------------------------------------------------------------------------
# 4. mmcv 2.1.0 with compiled ops (mmsegmentation 1.2.x needs mmcv < 2.2; no wheel exists for
#    current torch, so it is built from the PyPI sdist once and the wheel is cached).
# "With ops" = the right version and its compiled extension (mmcv/_ext*.so) on disk; a metadata
# look-up, not an import (importing torch takes seconds; step 5 imports everything once).
mmcv_ok() {
  "$PY" -c "import glob, os; from importlib.metadata import version; from importlib.util import find_spec
assert version('mmcv') == '$MMCV_VERSION'
assert glob.glob(os.path.join(os.path.dirname(find_spec('mmcv').origin), '_ext*.so'))" 2>/dev/null
}
if mmcv_ok; then
  log "mmcv $MMCV_VERSION with ops already importable"
elif [[ $SEGMENTATION == 0 ]]; then
  log "skipping mmcv (--without-segmentation): ADE20K / COCO-Stuff rewards and evaluation need it;" \
      "run 'bash scripts/setup.sh' once before using them (builds it, about 15 minutes on 2 cores)"
else
  WHEEL_DIR="$MMCV_WHEEL_CACHE/torch-$TORCH_TAG"
  WHEEL=$(ls "$WHEEL_DIR"/mmcv-$MMCV_VERSION-*.whl 2>/dev/null | head -n 1 || true)
  if [[ -z "$WHEEL" ]]; then
    log "building mmcv $MMCV_VERSION with ops from source (about 15 minutes on 2 cores, once)"
    BUILD=$(mktemp -d)
    SETUPTOOLS_BEFORE=$("$PY" -c 'from importlib.metadata import version; print(version("setuptools"))' 2>/dev/null || echo "")
    restore_setuptools() {
      [[ -n "$SETUPTOOLS_BEFORE" ]] && "${PIP[@]}" install -q "setuptools==$SETUPTOOLS_BEFORE" || true
      rm -rf "$BUILD"
    }
    trap restore_setuptools EXIT
    # mmcv 2.1.0's setup.py needs setuptools < 70 (pkg_resources / distutils APIs it uses).
    "${PIP[@]}" install -q -c "$CONSTRAINTS" "setuptools<70" wheel ninja numpy
    "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation "mmcv==$MMCV_VERSION" -d "$BUILD"
    tar -xzf "$BUILD/mmcv-$MMCV_VERSION.tar.gz" -C "$BUILD"
    # Current torch headers need C++17 at least and use C++20 features; mmcv pins c++14/17.
    sed -i 's/-std=c++14/-std=c++20/g; s/-std=c++17/-std=c++20/g' "$BUILD/mmcv-$MMCV_VERSION/setup.py"
    mkdir -p "$WHEEL_DIR"
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
      "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$BUILD/dist" "$BUILD/mmcv-$MMCV_VERSION"
    # Copy in under a temporary name, then rename: a killed build never leaves a broken wheel
    # in the cache that the next run would trust.
    built=$(ls "$BUILD"/dist/mmcv-*.whl)
    cp "$built" "$WHEEL_DIR/.partial.whl" && mv "$WHEEL_DIR/.partial.whl" "$WHEEL_DIR/$(basename "$built")"
    WHEEL="$WHEEL_DIR/$(basename "$built")"
    restore_setuptools
    trap - EXIT
  else
    log "installing cached $WHEEL"
  fi
  "${PIP[@]}" install -q -c "$CONSTRAINTS" "$WHEEL"
  mmcv_ok || { echo "setup: mmcv installed from $WHEEL but 'import mmcv.ops' fails; delete it and run again" >&2; exit 1; }
fi

# ---------------------------------------------------------------------------------------------
# 4b. Reference libraries for the tests only: the versions the paper's 2024 evaluation ran, in
#     their own folders (never on the project's import path). tests/reference_libs.py runs them
#     in a subprocess to check the paper-protocol metrics against the real thing.
REFERENCE_DIR="$VENV/reference"
for spec in torchmetrics==1.4.1; do
  target="$REFERENCE_DIR/${spec/==/-}"
  if [[ ! -f "$target/.complete" ]]; then
    log "installing the reference $spec into ${target#$ROOT/}"
    rm -rf "$target"
    "${PIP[@]}" install -q --no-deps --target "$target" "$spec"
    touch "$target/.complete"
  fi
done

# ---------------------------------------------------------------------------------------------
# 5. Check that what the project imports is importable, and say what we have.
SEGMENTATION=$SEGMENTATION "$PY" - <<'EOF'
import importlib
import os
from importlib.metadata import version
mods = {"torch": "torch", "torchvision": "torchvision", "diffusers": "diffusers",
        "transformers": "transformers", "accelerate": "accelerate", "datasets": "datasets",
        "kornia": "kornia", "torchmetrics": "torchmetrics", "cleanfid": "clean-fid",
        "mmengine": "mmengine", "gradio": "gradio"}
segmentation = os.environ["SEGMENTATION"] == "1"
if segmentation:
    mods.update({"mmcv": "mmcv", "mmseg": "mmsegmentation", "mmdet": "mmdet"})
versions = {}
for module, dist in mods.items():
    importlib.import_module(module)
    versions[dist] = version(dist)
if segmentation:
    import mmcv.ops  # noqa: F401  compiled ops are what mmseg's heads need
import torch
print("[setup] ok:", ", ".join(f"{k} {v}" for k, v in versions.items()))
print("[setup] device:", "cuda x%d" % torch.cuda.device_count() if torch.cuda.is_available() else "cpu")
if not segmentation:
    print("[setup] without segmentation: mmcv is not built (bash scripts/setup.sh builds it)")
EOF
log "done; activate with: source ${VENV#$ROOT/}/bin/activate"
