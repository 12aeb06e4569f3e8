#!/usr/bin/env bash
# The whole ControlNet++ chain on the toy world, on a CPU, with the launchers users run on GPUs:
#   setup -> toy world -> reward fine-tuning (train/reward_canny.sh) -> generation and metrics
#   for the base and the fine-tuned ControlNet (eval/eval_canny.sh) -> a table and a PNG grid.
#
#   bash scripts/quickstart.sh                 # results in work_dirs/quickstart/
#   QUICKSTART_STEPS=200 bash scripts/quickstart.sh
#
#   TOY=work_dirs/toy-pretrained bash scripts/quickstart.sh   # on the pretrained toy world
#
# The default toy models are tiny and random, so the numbers check the chain, not the method:
# the toy-scale reproduction of the paper's claim is `python -m toy.experiment` (README).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
START=$(date +%s)
stage() { printf '\n==== [%4ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }

stage "setup"
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1  # everything is local

TOY=${TOY:-work_dirs/toy}
OUT=${OUT:-work_dirs/quickstart}
STEPS=${QUICKSTART_STEPS:-100}
mkdir -p "$OUT"

# TOY=work_dirs/toy-pretrained (written by `python -m toy.experiment` or toy.pretrain)
# runs the same chain on the pretrained toy world, starting from its canny baseline ControlNet.
if python -c "import json, sys; sys.exit(0 if 'pretrained' in json.load(open(sys.argv[1])) else 1)" \
    "$TOY/toy_world.json" 2>/dev/null; then
  stage "pretrained toy world: $TOY"
else
  stage "toy world -> $TOY"
  python -m toy.world --out "$TOY"
fi
BASE=$TOY/toy-controlnet
if [ -f "$TOY/controlnets/canny/diffusion_pytorch_model.safetensors" ]; then BASE=$TOY/controlnets/canny; fi

stage "reward fine-tuning of the toy ControlNet on toy canny data ($STEPS steps)"
# The launcher's defaults are the paper's (8 GPUs, batch 8 x 4, 10k steps, fp16); the
# environment points it at the toy world and a CPU-sized run. The learning rate is raised
# from the paper's 1e-5 so that 100 steps visibly move a random toy model.
SD_PATH=$TOY/toy-sd15 CONTROLNET_PATH=$BASE REWARD_MODEL_PATH=canny \
DATASET=$TOY/datasets/MultiGen-20M_train OUTPUT_DIR=$OUT/reward_canny \
NUM_PROCESSES=1 MIXED_PRECISION=no RESOLUTION=64 TRAIN_BATCH_SIZE=8 GRAD_ACCUM=1 \
MAX_TRAIN_STEPS=$STEPS CHECKPOINTING_STEPS=$STEPS VALIDATION_STEPS=$STEPS NUM_WORKERS=2 \
  bash train/reward_canny.sh --learning_rate 1e-4 \
    --num_validation_inference_steps 10 --report_to tensorboard

for run in base:$BASE controlnet_pp:$OUT/reward_canny; do
  name=${run%%:*}
  stage "generation and metrics: $name (${run#*:})"
  SD_PATH=$TOY/toy-sd15 MODEL_PATH=${run#*:} DATASET=$TOY/datasets/MultiGen-20M_canny_eval \
  OUTPUT_DIR=$OUT/eval/$name NUM_PROCESSES=1 RESOLUTION=64 BATCH_SIZE=16 NUM_INFERENCE_STEPS=10 \
  NUM_GROUPS=4 MAX_SAMPLES=${QUICKSTART_SAMPLES:-32} INCEPTION_PATH=$TOY/fid/inception-toy.pt \
  CLIP_PATH=$TOY/clip REWARD_MODEL_PATH=canny \
    bash eval/eval_canny.sh
done

stage "summary"
python eval/summarize.py --run ControlNet=$OUT/eval/base --run ControlNet++=$OUT/eval/controlnet_pp \
  --output "$OUT/summary"
python - "$OUT" <<'EOF'
# One PNG to look at: for the first rows, the eval visualisation (condition | generations) of
# the base ControlNet above the fine-tuned one.
import sys
from pathlib import Path

from PIL import Image

from utils.io import save_image, vstack_images

out = Path(sys.argv[1])
rows = [Image.open(path) for idx in range(4) for run in ("base", "controlnet_pp")
        if (path := out / "eval" / run / "visualization" / f"{idx}.png").exists()]
save_image(vstack_images(rows), out / "grid.png")
print(f"grid: {out / 'grid.png'} (per row: base ControlNet, then ControlNet++)")
EOF
stage "done: $OUT/summary.md, $OUT/grid.png, training logs in $OUT/reward_canny/logs (tensorboard)"
