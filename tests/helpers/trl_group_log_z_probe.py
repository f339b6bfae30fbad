"""The TRL example script, recording every group estimate of log Z (``log_z_mode="group"``).

``python tests/helpers/trl_group_log_z_probe.py RECORD_DIR [example script arguments]``, run under
torchrun by tests/integrations/test_trl.py: it wraps
:func:`flowrl.integrations.trl.gathered_group_log_z` so that each call saves this process's inputs (its
rows' log-probs, mask, advantages, prompt keys) and its result to ``RECORD_DIR/rank<R>_call<K>.pt``,
then runs ``examples/trl/train_flowrl_trl.py``'s ``main`` with the remaining arguments. The test
recomputes the estimate of each call from both processes' records as one process would.
``--reward_function tests.helpers.trl_group_log_z_probe:digit_share`` gives rewards that vary.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path
from typing import Any

import torch

import flowrl.integrations.trl as trl_adapter

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "trl" / "train_flowrl_trl.py"


def digit_share(response: str, example: Any) -> float:
    """A reward a random tiny model gets varied values of (the synthetic task's is almost always 0)."""
    return sum(c.isdigit() for c in response) / max(1, len(response))


def main(argv: list[str]) -> int:
    record_dir, rest = Path(argv[0]), argv[1:]
    record_dir.mkdir(parents=True, exist_ok=True)
    estimate = trl_adapter.gathered_group_log_z
    calls = itertools.count()

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        log_z = estimate(*args, **kwargs)
        names = ("logprobs", "old_logprobs", "ref_logprobs", "advantages", "response_mask", "keys")
        record = {name: t.detach().cpu() for name, t in zip(names, args, strict=True)}
        record["log_z"] = log_z.cpu()
        record["options"] = {k: v for k, v in kwargs.items() if k not in ("gather", "process_index")}
        rank = kwargs["process_index"]
        torch.save(record, record_dir / f"rank{rank}_call{next(calls)}.pt")
        return log_z

    trl_adapter.gathered_group_log_z = recording  # the trainer looks the name up at each call
    spec = importlib.util.spec_from_file_location("train_flowrl_trl", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = example  # its dataclasses look their module up there
    spec.loader.exec_module(example)
    return example.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
