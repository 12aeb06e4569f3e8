# Shared by the train/*.sh launchers (sourced, not run): builds and runs the `accelerate launch`
# command. Environment variables (all optional):
#   NUM_PROCESSES      processes (GPUs); default 8 as in the paper. >1 adds --multi_gpu; 1 runs the
#                      script with python directly (no launcher needed for one process).
#   ACCELERATE_CONFIG  an accelerate config file (train/configs/*.yaml), e.g. for several nodes
#                      or DeepSpeed ZeRO-2; NUM_PROCESSES still overrides its process count.
#   MACHINE_RANK, MAIN_PROCESS_IP   with ACCELERATE_CONFIG, several nodes: this node's rank, node 0's address.
#   MIXED_PRECISION    fp16 (paper) | bf16 | no; default fp16 on GPU, no on a CPU-only machine.
# Without a visible GPU, ACCELERATE_USE_CPU=1 is set so that NUM_PROCESSES CPU processes form a
# real gloo process group (without it accelerate starts independent, non-distributed runs).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

has_gpu() {
    [[ "${CUDA_VISIBLE_DEVICES-unset}" != "" ]] && command -v nvidia-smi >/dev/null 2>&1 \
        && nvidia-smi -L 2>/dev/null | grep -q GPU
}

if has_gpu; then
    MIXED_PRECISION="${MIXED_PRECISION:-fp16}"
else
    export ACCELERATE_USE_CPU=1
    if [[ -z "${MIXED_PRECISION:-}" ]]; then
        echo "No GPU visible: training on CPU in fp32 (MIXED_PRECISION=no); fp16 needs a GPU." >&2
        MIXED_PRECISION=no
    fi
fi

# `accelerate` from PATH, else the repository's virtual environment.
ACCELERATE_BIN="$(command -v accelerate || true)"
if [[ -z "$ACCELERATE_BIN" && -x "$REPO_ROOT/.venv/bin/accelerate" ]]; then
    ACCELERATE_BIN="$REPO_ROOT/.venv/bin/accelerate"
fi
if [[ -z "$ACCELERATE_BIN" ]]; then
    echo "accelerate is not installed (pip install accelerate) and $REPO_ROOT/.venv has none." >&2
    exit 1
fi

# The Python that belongs to that accelerate (for one-process runs, which need no launcher).
PYTHON_BIN="$(dirname "$ACCELERATE_BIN")/python"
if [[ ! -x "$PYTHON_BIN" ]]; then PYTHON_BIN="$(command -v python3 || command -v python || true)"; fi
if [[ -z "$PYTHON_BIN" ]]; then
    echo "No python next to $ACCELERATE_BIN nor on PATH." >&2
    exit 1
fi

# run_accelerate SCRIPT ARGS...: print the resolved command, then run it.
run_accelerate() {
    local script="$1"
    shift
    local launch
    if [[ -z "${ACCELERATE_CONFIG:-}" && "${NUM_PROCESSES:-8}" == 1 ]]; then
        # One process: `accelerate launch` would only start this same command in a subprocess,
        # after ~5 s of its own imports; the script's Accelerator finds the single-process setup
        # itself (device, --mixed_precision), so run it directly. OMP_NUM_THREADS defaults to 1
        # as accelerate launch sets it (set it yourself for a CPU run with more threads).
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
        launch=("$PYTHON_BIN" "$script")
    else
        launch=("$ACCELERATE_BIN" launch)
        if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then
            launch+=(--config_file "$ACCELERATE_CONFIG")
            if [[ -n "${NUM_PROCESSES:-}" ]]; then launch+=(--num_processes "$NUM_PROCESSES"); fi
            # Several nodes: the same command on each, with its rank and node 0's address.
            if [[ -n "${MACHINE_RANK:-}" ]]; then launch+=(--machine_rank "$MACHINE_RANK"); fi
            if [[ -n "${MAIN_PROCESS_IP:-}" ]]; then launch+=(--main_process_ip "$MAIN_PROCESS_IP"); fi
        else
            local n="${NUM_PROCESSES:-8}"
            if (( n > 1 )); then launch+=(--multi_gpu); fi
            launch+=(--num_processes "$n" --num_machines 1 --dynamo_backend no)
        fi
        launch+=(--mixed_precision "$MIXED_PRECISION" "$script")
    fi
    local cmd=("${launch[@]}" --mixed_precision "$MIXED_PRECISION" "$@")
    echo "+ ${ACCELERATE_USE_CPU:+ACCELERATE_USE_CPU=1 }$(printf '%q ' "${cmd[@]}")"
    "${cmd[@]}"
}

# The paper's settings shared by every task (REFERENCE.md "Hyper-parameters"): 8 GPUs x batch 8
# x accumulation 4 = 256, 512 px, AdamW lr 1e-5 (betas 0.9/0.999, wd 1e-2, eps 1e-8), max grad
# norm 1, constant lr after warmup, gradient checkpointing, EMA, checkpoint every 500 steps,
# validation every 100 (UniPC, 20 steps). `--resume_from_checkpoint latest` makes re-running a
# launcher continue from the last checkpoint in OUTPUT_DIR (a fresh start when there is none).
# Fills the array PAPER_ARGS; $1 = default steps, $2 = warmup in optimizer steps.
# Warmup: the original passed --lr_warmup_steps F (0 canny; 10 hed, lineart, depth, COCO-Stuff; 200
# ADE20K and both fine-tunes) and multiplied it by the accumulation steps (4), while accelerate
# stepped its scheduler once per process (8) per optimizer step: the learning rate reached its
# value after F x 4 / 8 optimizer steps. The launchers pass those effective counts (0 / 5 / 100);
# --lr_warmup_steps here counts optimizer steps (docs/FIDELITY.md).
paper_args() {
    PAPER_ARGS=(
        --pretrained_model_name_or_path "${SD_PATH:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
        --resolution "${RESOLUTION:-512}"
        --train_batch_size "${TRAIN_BATCH_SIZE:-8}"
        --gradient_accumulation_steps "${GRAD_ACCUM:-4}"
        --max_train_steps "${MAX_TRAIN_STEPS:-$1}"
        --learning_rate 1e-5
        --lr_scheduler constant_with_warmup
        --lr_warmup_steps "$2"
        --adam_beta1 0.9 --adam_beta2 0.999 --adam_weight_decay 1e-2 --adam_epsilon 1e-8
        --max_grad_norm 1.0
        --gradient_checkpointing
        --use_ema
        --checkpointing_steps "${CHECKPOINTING_STEPS:-500}"
        --validation_steps "${VALIDATION_STEPS:-100}"
        --num_validation_inference_steps 20
        --dataloader_num_workers "${NUM_WORKERS:-4}"
        --seed 0
        --resume_from_checkpoint latest
    )
}

# The reward window of the paper (Sec. 3.3): t ~ U[0, 1000), reward where t <= 200.
REWARD_WINDOW_ARGS=(
    --timestep_sampling_start 0 --timestep_sampling_end 1000
    --min_timestep_rewarding 0 --max_timestep_rewarding 200
)

# Optional reward-model flags, passed only when their variable is set.
reward_model_args() {
    REWARD_ARGS=(--reward_model_name_or_path "${REWARD_MODEL_PATH:-$1}")
    if [[ -n "${REWARD_MODEL_CHECKPOINT:-}" ]]; then
        REWARD_ARGS+=(--reward_model_checkpoint "$REWARD_MODEL_CHECKPOINT")
    fi
}

# CPO (train/cpo_<task>.sh), as its launchers ran it (ZonglinL/CPO train/reward_<task>_CPO.sh):
# 4 GPUs (train/config.yml there) x batch 8 x accumulation $2, AdamW at lr $3 (betas 0.9/0.999,
# wd 1e-2, eps 1e-8), max grad norm 1, constant lr after warmup, beta_dpo 5000, t ~ U[0, 1000),
# checkpoint and validation (one prompt) every 1000 steps, starting from ControlNet++ weights.
# Warmup: CPO passed --lr_warmup_steps 100, multiplied by the accumulation steps, with the
# scheduler stepped once per process (4) per optimizer step: 100 x 8 / 4 = 200 optimizer steps
# with accumulation 8, 100 x 2 / 4 = 50 with 2; $4 is that effective count.
# Fills the array CPO_ARGS; $1 = default steps, $2 = accumulation, $3 = learning rate, $4 = warmup.
cpo_args() {
    NUM_PROCESSES="${NUM_PROCESSES:-4}"
    CPO_ARGS=(
        --objective cpo
        --pretrained_model_name_or_path "${SD_PATH:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
        --resolution "${RESOLUTION:-512}"
        --train_batch_size "${TRAIN_BATCH_SIZE:-8}"
        --gradient_accumulation_steps "${GRAD_ACCUM:-$2}"
        --max_train_steps "${MAX_TRAIN_STEPS:-$1}"
        --learning_rate "$3"
        --lr_scheduler constant_with_warmup
        --lr_warmup_steps "$4"
        --adam_beta1 0.9 --adam_beta2 0.999 --adam_weight_decay 1e-2 --adam_epsilon 1e-8
        --max_grad_norm 1.0
        --gradient_checkpointing
        --timestep_sampling_start 0 --timestep_sampling_end 1000
        --beta_dpo 5000
        --checkpointing_steps "${CHECKPOINTING_STEPS:-1000}"
        --validation_steps "${VALIDATION_STEPS:-1000}"
        --max_val_samples 1
        --num_validation_inference_steps 20
        --dataloader_num_workers "${NUM_WORKERS:-8}"
        --seed 0
        --resume_from_checkpoint latest
    )
}
