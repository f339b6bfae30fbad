"""Train a causal LM with FlowRL on TRL (``flowrl.integrations.trl.FlowRLTrainer``).

One script for every scale; the launcher decides how many processes run it (docs/trl.md):

    # one process (CPU or one GPU)
    python examples/trl/train_flowrl_trl.py --config examples/trl/flowrl_math.yaml \
        --model_name_or_path Qwen/Qwen2.5-0.5B --train_files data/math.parquet --output_dir runs/trl

    # several processes on one machine (DDP); on CPU add --use_cpu true --bf16 false
    torchrun --standalone --nproc_per_node 2 examples/trl/train_flowrl_trl.py ...

    # 8 GPUs with DeepSpeed ZeRO-3, or several nodes (one command per node)
    accelerate launch --config_file examples/trl/zero3.yaml examples/trl/train_flowrl_trl.py ...

Data: files in the project's schema (verl's: ``prompt`` as chat messages, ``data_source``,
``reward_model.ground_truth``, ...), ``.parquet`` or ``.jsonl``. Reward: ``--reward_function
module:function`` for every row, or by default the project's reward for each row's ``data_source``.
Every ``FlowRLConfig`` field (TRL's ``GRPOConfig`` plus ``flowrl_*`` and ``log_z_*``) is a flag or a key
of the ``--config`` YAML; flags override the YAML.

Prompts longer than ``--flowrl_max_prompt_length`` tokens (the paper's 2048; ``None`` for no cap) are
removed before training; the count is printed at the start and recorded in ``run_info.json``.

At the end the policy is saved to ``--output_dir`` (without the log Z head) with the head beside it
(``log_z_head.safetensors``; ``--log_z_mode group`` has no head), and the main process writes
``run_info.json``: the number of processes that actually ran, the engine, versions, the prompts the cap
removed and the logged metrics.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
import trl

from flowrl.data.schema import read_rows
from flowrl.integrations.trl import FlowRLConfig, FlowRLReward, FlowRLTrainer, trl_dataset
from flowrl.policy import load_tokenizer
from flowrl.rewards.base import load_callable


@dataclass
class ScriptArguments:
    """What the script needs beyond ``FlowRLConfig``."""

    model_name_or_path: str = field(metadata={"help": "Local directory or hub id of a causal LM."})
    train_files: list[str] = field(
        metadata={"help": "Training data in the project's schema (.parquet or .jsonl), one or more files."}
    )
    reward_function: str | None = field(
        default=None,
        metadata={
            "help": "'module:function' scoring every row as fn(response, example); default: the project's "
            "reward for each row's data_source."
        },
    )
    reward_num_workers: int | None = field(
        default=None,
        metadata={"help": "Processes for math checks and sandboxed programs (default: half the cores)."},
    )


def main(argv: list[str] | None = None) -> int:
    parser = trl.TrlParser((ScriptArguments, FlowRLConfig))
    script_args, args = parser.parse_args_and_config(argv)

    tokenizer = load_tokenizer(script_args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    rows = [row for path in script_args.train_files for row in read_rows(path)]
    reward_fn = load_callable(script_args.reward_function) if script_args.reward_function else None
    trainer = FlowRLTrainer(
        model=script_args.model_name_or_path,
        reward_funcs=FlowRLReward(reward_fn, num_workers=script_args.reward_num_workers),
        args=args,
        train_dataset=trl_dataset(rows, tokenizer),
        processing_class=tokenizer,
    )
    for name, counts in trainer.prompts_filtered.items():
        if trainer.accelerator.is_main_process:
            print(
                f"{name}: {counts['filtered']} of {counts['total']} prompts longer than "
                f"{counts['max_prompt_length']} tokens removed, {counts['kept']} left"
            )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)

    state = trainer.accelerator.state
    if trainer.accelerator.is_main_process:
        info = {
            "world_size": trainer.accelerator.num_processes,
            "distributed_type": str(state.distributed_type),
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "trl": trl.__version__,
            },
            "prompts_filtered": trainer.prompts_filtered,
            "log_history": trainer.state.log_history,
        }
        (Path(args.output_dir) / "run_info.json").write_text(json.dumps(info, indent=2))
        head = f" and {args.output_dir}/log_z_head.safetensors" if trainer.log_z_head is not None else ""
        print(f"saved the policy{head}; {info['world_size']} process(es)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
