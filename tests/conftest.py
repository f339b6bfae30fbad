"""Fixtures shared by the trainer tests: a tiny random Qwen2-architecture model and the demo's prompts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from flowrl.data import synthetic
from flowrl.data.schema import write_rows

TINY = dict(hidden_size=32, num_layers=1, num_heads=2)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the whole session. The tests' models are tiny, so a second thread only adds
    overhead and fights the other processes (verifier workers, sandboxes, other jobs) for the cores: on a
    loaded 2-core machine the trainer tests ran ten times slower with two. Set once for every test, so no
    test's speed depends on which ran before it (``flowrl demo`` sets one thread for good)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model saved as a Hugging Face directory, loaded through the real loader."""
    return synthetic.save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, **TINY)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digit-sum prompts in verl's schema (JSON Lines)."""
    return write_rows(synthetic.rows(), tmp_path_factory.mktemp("data") / "train.jsonl")


def write_config(path: Path, items: list[str]) -> Path:
    """Save dotted ``key=value`` overrides as a YAML config file for ``flowrl train``."""
    OmegaConf.save(OmegaConf.from_dotlist(items), path)
    return path


def trainer_overrides(model_dir: Path, data_file: Path, out: Path, **extra: object) -> list[str]:
    """Dotted overrides for a two-step run on the tiny model (``extra`` adds or replaces keys)."""
    base = {
        "model.path": model_dir,
        "data.train_files": f"[{data_file}]",
        "data.max_prompt_length": 16,
        "rollout.num_samples_per_prompt": 4,
        "rollout.max_new_tokens": 6,
        "train.prompts_per_step": 4,
        "train.mini_batch_size": 8,
        "train.micro_batch_size": 4,
        "train.total_steps": 2,
        "train.save_every": 0,
        "train.sample_every": 1,
        "train.progress": "false",
        "train.tensorboard": "false",
        "train.plot": "false",
        "train.output_dir": out,
        "optim.lr": 1e-2,
        "optim.warmup_steps": 1,
        "log_z.lr": 1e-1,
        "reward.function": "flowrl.data.synthetic:reward",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
