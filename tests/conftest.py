"""Fixtures shared by the trainer tests: a tiny random Qwen2-architecture model and the demo's prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flowrl.data import synthetic
from flowrl.data.schema import write_rows

TINY = dict(hidden_size=32, num_layers=1, num_heads=2)


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
