"""End to end through ``flowrl.commands.main`` on the demo's tiny model: data -> train -> export -> eval."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from flowrl import commands
from flowrl.data import synthetic
from flowrl.data.schema import read_rows, write_rows

TINY = dict(hidden_size=32, num_layers=1, num_heads=2)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and do not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_data_train_export_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 1. data: `flowrl data prepare` converts public datasets; the demo's synthetic task has no raw
    #    release to convert, so its rows are written with the schema helpers and read back validated.
    data = write_rows(synthetic.rows(), tmp_path / "data" / "digit_sum.jsonl")
    assert len(read_rows(data)) == len(synthetic.SUMS)
    base = synthetic.save_tiny_model(tmp_path / "base", seed=0, **TINY)

    # 2. train: two FlowRL steps
    run = tmp_path / "run"
    config = {
        "model": {"path": str(base)},
        "data": {"train_files": [str(data)], "max_prompt_length": 16},
        "rollout": {"num_samples_per_prompt": 4, "max_new_tokens": 6},
        "train": {
            "prompts_per_step": 4,
            "mini_batch_size": 16,
            "micro_batch_size": 8,
            "total_steps": 2,
            "save_every": 0,
            "sample_every": 0,
            "progress": False,
            "tensorboard": False,
            "plot": False,
            "output_dir": str(run),
        },
        "optim": {"lr": 1e-2, "warmup_steps": 1},
        "reward": {"function": "flowrl.data.synthetic:reward"},
    }
    OmegaConf.save(OmegaConf.create(config), tmp_path / "train.yaml")
    assert commands.main(["train", str(tmp_path / "train.yaml")]) == 0

    # 3. export the run's final checkpoint
    exported = tmp_path / "exported"
    assert commands.main(["export", str(run), str(exported)]) == 0
    assert (exported / "config.json").is_file() and (
        exported / "log_z_head" / "log_z_head.safetensors"
    ).is_file()

    # 4. eval: the base model, the export, and the run directory itself
    out = tmp_path / "eval"
    args = ["--data", str(data), "--output-dir", str(out), "--n", "4", "--max-new-tokens", "6"]
    args += ["--reward", "flowrl.data.synthetic:reward"]
    models = ["--model", f"base={base}", "--model", str(exported), "--model", f"trained={run}"]
    capsys.readouterr()
    assert commands.main(["eval", *models, *args]) == 0
    printed = capsys.readouterr().out
    assert "avg@n" in printed and "trained" in printed

    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["base", "exported", "trained"]
    assert results["models"]["trained"]["checkpoint"].endswith("step_000002")
    for model in results["models"].values():
        summary = model["benchmarks"]["synthetic_digit_sum"]
        assert summary["num_problems"] == len(synthetic.SUMS) and summary["num_samples"] == 4
        assert 0.0 <= summary["avg@4"] <= summary["pass@4"] <= 1.0
    assert (out / "report.md").read_text().count("| trained | synthetic_digit_sum |") == 3  # three tables
    assert (out / "pass_at_k.png").read_bytes()[:4] == b"\x89PNG"

    def responses(label: str) -> list[list[str]]:
        path = out / "generations" / label / "synthetic_digit_sum.jsonl"
        return [json.loads(line)["responses"] for line in path.read_text().splitlines()]

    # the export holds the run's final weights: same seed, same samples; training changed the model
    assert responses("exported") == responses("trained")
    assert responses("base") != responses("trained")


def test_prepare_train_export_eval_on_public_dataset_files(tmp_path: Path) -> None:
    """The same chain from published dataset layouts (GSM8K to train, MATH-500 to evaluate), rewarded by
    the registry's math checker by data_source: the tiny model answers nothing right, and every one of
    its responses must still be scored (wrong or no answer), none failed."""
    fixtures = Path(__file__).parent / "data" / "fixtures"
    train_file, eval_file = tmp_path / "gsm8k.parquet", tmp_path / "math500.parquet"
    assert commands.main(["data", "prepare", "gsm8k", "--input", str(fixtures / "gsm8k_train.jsonl"),
                     "--output", str(train_file)]) == 0  # fmt: skip
    assert commands.main(["data", "prepare", "math500", "--input", str(fixtures / "math500_test.jsonl"),
                     "--output", str(eval_file)]) == 0  # fmt: skip
    rows = read_rows(train_file)
    base = synthetic.save_tiny_model(tmp_path / "base", seed=0, **TINY)

    run = tmp_path / "run"
    items = [
        f"model.path={base}",
        f"data.train_files=[{train_file}]",
        "data.max_prompt_length=2048",
        "rollout.num_samples_per_prompt=2",
        "rollout.max_new_tokens=4",
        f"train.prompts_per_step={len(rows)}",
        f"train.mini_batch_size={2 * len(rows)}",
        f"train.micro_batch_size={2 * len(rows)}",
        "train.total_steps=1",
        "train.sample_every=0",
        "train.progress=false",
        "train.tensorboard=false",
        "train.plot=false",
        f"train.output_dir={run}",
        "reward.num_workers=1",
    ]
    OmegaConf.save(OmegaConf.from_dotlist(items), tmp_path / "train.yaml")
    assert commands.main(["train", str(tmp_path / "train.yaml")]) == 0
    step = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    scored = step["reward/status_wrong"] + step["reward/status_no_answer"] + step["reward/status_correct"]
    assert scored == 2 * len(rows) and step["reward/failed"] == 0

    exported = tmp_path / "exported"
    assert commands.main(["export", str(run), str(exported)]) == 0
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(exported), "--data", str(eval_file), "--output-dir", str(out)]
    assert commands.main([*argv, "--n", "2", "--max-new-tokens", "4", "--num-workers", "1"]) == 0
    summary = json.loads((out / "results.json").read_text())["models"]["exported"]["benchmarks"]
    (name,) = summary
    assert summary[name]["num_problems"] == len(read_rows(eval_file)) and summary[name]["num_samples"] == 2
    assert (out / "report.md").exists()
