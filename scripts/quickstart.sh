#!/usr/bin/env bash
# The whole ControlNet++ chain on the pretrained toy world, on a CPU, with the launchers users
# run on GPUs:
#   setup (without mmcv) -> the shipped pretrained toy world (toy/weights, datasets regenerated)
#   -> reward fine-tuning of its canny ControlNet (train/reward_canny.sh) -> generation and
#   paper-protocol metrics of the base and the fine-tuned ControlNet (eval/eval_canny.sh)
#   -> a table and a PNG grid.
#
#   bash scripts/quickstart.sh                      # results in work_dirs/quickstart/
#   QUICKSTART_STEPS=200 bash scripts/quickstart.sh
#   TOY=work_dirs/toy bash scripts/quickstart.sh    # a random toy world instead: checks the chain only
#
# Canny needs no segmentation model, so setup skips mmcv's 15-minute build here
# (`bash scripts/setup.sh` builds it; the test command does).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
START=$(date +%s)
stage() { printf '\n==== [%4ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }

stage "setup (without segmentation)"
bash scripts/setup.sh --without-segmentation
# shellcheck disable=SC1091
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1  # everything is local

TOY=${TOY:-work_dirs/toy-pretrained}
OUT=${OUT:-work_dirs/quickstart}
STEPS=${QUICKSTART_STEPS:-100}
mkdir -p "$OUT"

if [[ "$TOY" == work_dirs/toy-pretrained ]]; then
  stage "the shipped pretrained toy world -> $TOY"
  python -m toy.committed --out "$TOY"   # seconds when it is already there
elif [[ -f "$TOY/toy_world.json" ]]; then
  stage "toy world: $TOY"
else
  stage "random toy world -> $TOY"
  python -m toy.world --out "$TOY"
fi
BASE=$TOY/toy-controlnet
if [ -f "$TOY/controlnets/canny/diffusion_pytorch_model.safetensors" ]; then BASE=$TOY/controlnets/canny; fi

stage "reward fine-tuning of the toy canny ControlNet ($BASE) on toy canny data ($STEPS steps)"
# The launcher's defaults are the paper's (8 GPUs, batch 8 x 4, 10k steps, fp16); the
# environment points it at the toy world and a CPU-sized run. The learning rate is raised
# from the paper's 1e-5 so that 100 steps move a tiny toy model.
SD_PATH=$TOY/toy-sd15 CONTROLNET_PATH=$BASE REWARD_MODEL_PATH=canny \
DATASET=$TOY/datasets/MultiGen-20M_train OUTPUT_DIR=$OUT/reward_canny \
NUM_PROCESSES=1 MIXED_PRECISION=no RESOLUTION=64 TRAIN_BATCH_SIZE=8 GRAD_ACCUM=1 \
MAX_TRAIN_STEPS=$STEPS CHECKPOINTING_STEPS=$STEPS VALIDATION_STEPS=$STEPS NUM_WORKERS=2 \
  bash train/reward_canny.sh --learning_rate ${QUICKSTART_LR:-1e-4} \
    --num_validation_inference_steps 10 --report_to tensorboard

for run in base:$BASE controlnet_pp:$OUT/reward_canny; do
  name=${run%%:*}
  stage "generation and metrics: $name (${run#*:})"
  SD_PATH=$TOY/toy-sd15 MODEL_PATH=${run#*:} DATASET=$TOY/datasets/MultiGen-20M_canny_eval \
  OUTPUT_DIR=$OUT/eval/$name NUM_PROCESSES=1 RESOLUTION=64 BATCH_SIZE=32 NUM_INFERENCE_STEPS=10 \
  NUM_GROUPS=4 MAX_SAMPLES=${QUICKSTART_SAMPLES:-32} INCEPTION_PATH=$TOY/fid/inception-toy.pt \
  CLIP_PATH=$TOY/clip REWARD_MODEL_PATH=canny \
    bash eval/eval_canny.sh
done

stage "summary"
python eval/summarize.py --run ControlNet=$OUT/eval/base --run ControlNet++=$OUT/eval/controlnet_pp \
  --output "$OUT/summary"
python - "$OUT" <<'EOF'
# One PNG to look at: per prompt, the canny condition, then the base ControlNet's images, then
# the fine-tuned ones (the same seeds); 64 px tiles shown at 2x.
import json
import sys
from pathlib import Path

from PIL import Image

from eval.common import annotation_path, generated_path
from utils.io import hstack_images, save_image, vstack_images

out = Path(sys.argv[1])
runs = [out / "eval" / "base", out / "eval" / "controlnet_pp"]
groups = json.loads((runs[0] / "eval_config.json").read_text())["num_groups"]
tile = lambda path: Image.open(path).convert("RGB").resize((128, 128), Image.NEAREST)  # noqa: E731
gap = Image.new("RGB", (8, 128), "white")
lines = []
for row in range(6):
    if not all(generated_path(run, g, row).is_file() for run in runs for g in range(groups)):
        break
    tiles = [tile(annotation_path(runs[0], row))]
    for run in runs:
        tiles += [gap] + [tile(generated_path(run, g, row)) for g in range(groups)]
    lines.append(hstack_images(tiles))
save_image(vstack_images(lines), out / "grid.png")
print(f"grid: {out / 'grid.png'} (per prompt: canny condition | {groups} images of the base ControlNet | "
      f"{groups} of the fine-tuned one, same seeds)")
for name, run in (("base ControlNet", runs[0]), ("fine-tuned (ControlNet++)", runs[1])):
    f1 = json.loads((run / "results.json").read_text())["edge_paper"]["metrics"]["f1"]
    print(f"{name:26s} Canny F1, paper protocol: {f1:.2f}")
EOF
stage "done: $OUT/summary.md, $OUT/grid.png, training logs in $OUT/reward_canny/logs (tensorboard)"
