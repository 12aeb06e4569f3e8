# Shared body of the eval/eval_<task>.sh launchers: generation, then the metrics.
# The launcher sets TASK_NAME, DEFAULT_DATASET, DEFAULT_MODEL_PATH, METRIC_SCRIPT and
# TASK_ARGS (an array), then sources this file with its own arguments (appended to eval.py).
# Every setting below can be overridden by an environment variable of the same name.
set -euo pipefail

SD_PATH=${SD_PATH:-stable-diffusion-v1-5/stable-diffusion-v1-5}    # SD1.5 (the runwayml repo was removed)
MODEL_PATH=${MODEL_PATH:-$DEFAULT_MODEL_PATH}                # the ControlNet to evaluate
DATASET=${DATASET:-$DEFAULT_DATASET}
SPLIT=${SPLIT:-validation}
OUTPUT_DIR=${OUTPUT_DIR:-work_dirs/eval/${BENCHMARK:-$TASK_NAME}/$(basename "$MODEL_PATH")}
NUM_PROCESSES=${NUM_PROCESSES:-8}                            # the paper: 8 GPUs
RESOLUTION=${RESOLUTION:-512}
BATCH_SIZE=${BATCH_SIZE:-16}                                 # images per pipeline call (4 prompts x 4)
NUM_INFERENCE_STEPS=${NUM_INFERENCE_STEPS:-20}               # UniPC, 20 steps
GUIDANCE_SCALE=${GUIDANCE_SCALE:-7.5}
NUM_GROUPS=${NUM_GROUPS:-4}                                  # images per prompt
MAX_SAMPLES=${MAX_SAMPLES:-}                                 # empty: the whole split
REWARD_MODEL_PATH=${REWARD_MODEL_PATH:-}                     # annotator; empty: the paper's reward model
REWARD_MODEL_CHECKPOINT=${REWARD_MODEL_CHECKPOINT:-}
EVAL_MODEL_PATH=${EVAL_MODEL_PATH:-}                         # depth / segmentation scorer; empty: the paper's
EVAL_MODEL_CHECKPOINT=${EVAL_MODEL_CHECKPOINT:-}
INCEPTION_PATH=${INCEPTION_PATH:-}                           # empty: clean-fid downloads inception-2015-12-05.pt
CLIP_PATH=${CLIP_PATH:-openai/clip-vit-base-patch16}
MIXED_PRECISION=${MIXED_PRECISION:-}                         # empty: fp16 on CUDA, fp32 on CPU
DRY_RUN=${DRY_RUN:-0}                                        # 1: print the commands only

PYTHON=${PYTHON:-python}
if [ "$NUM_PROCESSES" -gt 1 ]; then
    LAUNCH=(accelerate launch --multi_gpu --num_processes "$NUM_PROCESSES" --num_machines 1
            --mixed_precision no --dynamo_backend no)
    # Without a CUDA GPU, accelerate needs this to form a CPU (gloo) process group.
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        export ACCELERATE_USE_CPU=1
    fi
else
    LAUNCH=("$PYTHON")
fi

run() {
    echo "+ $*"
    if [ "$DRY_RUN" != 1 ]; then "$@"; fi
}

GENERATE=("${LAUNCH[@]}" eval/eval.py --task_name "$TASK_NAME" --dataset_name "$DATASET" --dataset_split "$SPLIT"
          --model_path "$MODEL_PATH" --sd_path "$SD_PATH" --output_dir "$OUTPUT_DIR"
          --resolution "$RESOLUTION" --batch_size "$BATCH_SIZE" --num_inference_steps "$NUM_INFERENCE_STEPS"
          --guidance_scale "$GUIDANCE_SCALE" --num_groups "$NUM_GROUPS" "${TASK_ARGS[@]}")
if [ -n "$MAX_SAMPLES" ]; then GENERATE+=(--max_samples "$MAX_SAMPLES"); fi
if [ -n "$REWARD_MODEL_PATH" ]; then GENERATE+=(--reward_model_name_or_path "$REWARD_MODEL_PATH"); fi
if [ -n "$REWARD_MODEL_CHECKPOINT" ]; then GENERATE+=(--reward_model_checkpoint "$REWARD_MODEL_CHECKPOINT"); fi
if [ -n "$MIXED_PRECISION" ]; then GENERATE+=(--mixed_precision "$MIXED_PRECISION"); fi
run "${GENERATE[@]}" "$@"

SCORE=("$PYTHON" "eval/$METRIC_SCRIPT" --root_dir "$OUTPUT_DIR")
if [ -n "$EVAL_MODEL_PATH" ]; then SCORE+=(--eval_model_name_or_path "$EVAL_MODEL_PATH"); fi
if [ -n "$EVAL_MODEL_CHECKPOINT" ]; then SCORE+=(--eval_model_checkpoint "$EVAL_MODEL_CHECKPOINT"); fi
# Writes both scorings: the paper protocol (the original's computation, <metric>_paper in results.json)
# and the corrected one (<metric>); see docs/FIDELITY.md.
run "${SCORE[@]}"

FID=("$PYTHON" eval/eval_fid.py --root_dir "$OUTPUT_DIR")
if [ -n "$INCEPTION_PATH" ]; then FID+=(--inception_path "$INCEPTION_PATH"); fi
run "${FID[@]}"
run "$PYTHON" eval/eval_clip.py --root_dir "$OUTPUT_DIR" --clip_model_name_or_path "$CLIP_PATH"
echo "results: $OUTPUT_DIR/results.json"
