#!/usr/bin/env bash
# FlowRL on verl 0.9: Qwen2.5-7B (base) on DAPO-Math-17k, the paper's 7B math run (arXiv 2509.15207;
# docs/algorithm.md#4-training-settings): 1 node x 8 GPUs, 512 prompts x 8 samples per step, 16 optimizer steps
# per rollout batch (mini-batch 32 prompts = 256 sequences), 2048 / 8192 prompt / response tokens,
# temperature 1.0, AdamW lr 1e-6, weight decay 0.1, grad clip 1.0, 10 warm-up steps, 200 steps.
# NOT RUN: written against verl 0.9.1's config schema (checked on CPU by tests/integrations/test_verl.py);
# no GPU run of it has been made (docs/verl.md).
#
# Data: flowrl data prepare math_dapo --input <DAPO-Math-17k parquet> --template dapo \
#           --output "$DATA_DIR/math_dapo.parquet"
# Usage: MODEL_PATH=... DATA_DIR=... bash configs/verl/qwen2.5-7b_math.sh [KEY=VALUE ...]
set -euo pipefail
MODEL_PATH=${MODEL_PATH:-Qwen/Qwen2.5-7B}
DATA_DIR=${DATA_DIR:-data}

exec "${PYTHON:-python3}" -m flowrl.integrations.verl.main \
    data.train_files="$DATA_DIR/math_dapo.parquet" \
    data.val_files="$DATA_DIR/math_dapo.parquet" \
    data.train_batch_size=512 \
    data.max_prompt_length=2048 \
    data.max_response_length=8192 \
    data.filter_overlong_prompts=true \
    actor_rollout_ref.model.path="$MODEL_PATH" \
    actor_rollout_ref.model.use_remove_padding=true \
    actor_rollout_ref.model.enable_gradient_checkpointing=true \
    actor_rollout_ref.actor.ppo_mini_batch_size=32 \
    actor_rollout_ref.actor.use_dynamic_bsz=true \
    actor_rollout_ref.actor.ppo_max_token_len_per_gpu=20480 \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.optim.lr_warmup_steps=10 \
    actor_rollout_ref.actor.optim.clip_grad=1.0 \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    flowrl.beta=15.0 \
    flowrl.importance_weight=clamp \
    flowrl.log_z.num_layers=3 \
    reward.custom_reward_function.path=pkg://flowrl.integrations.verl.reward \
    trainer.nnodes=1 \
    trainer.n_gpus_per_node=8 \
    trainer.total_training_steps=200 \
    trainer.save_freq=20 \
    trainer.test_freq=-1 \
    trainer.val_before_train=false \
    trainer.project_name=flowrl \
    trainer.experiment_name=qwen2.5-7b-math-flowrl \
    "$@"
