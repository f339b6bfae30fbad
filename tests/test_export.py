"""``flowrl export``: checkpoint -> Hugging Face model directory, with the log Z head kept out of it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flowrl import commands
from flowrl.checkpoint import COMPLETE_MARKER, HEAD_FILE, MODEL_DIR, load_log_z_head, save_checkpoint
from flowrl.data import synthetic
from flowrl.export import EXPORT_INFO_FILE, HEAD_SUBDIR, export_checkpoint, load_exported_head
from flowrl.partition import LOG_Z_PREFIX, LogZHead
from flowrl.policy import load_model, load_tokenizer

TINY = dict(hidden_size=32, num_layers=1, num_heads=2)
HEAD_LAYERS = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and do not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save_run(root: Path, *, with_head: bool) -> Path:
    """A run directory holding complete checkpoints at steps 1 and 2, with different weights."""
    base = synthetic.save_tiny_model(root / "base", seed=0, **TINY)
    tokenizer, model = load_tokenizer(str(base)), load_model(str(base))
    torch.manual_seed(0)
    head = LogZHead(TINY["hidden_size"], num_layers=HEAD_LAYERS) if with_head else None
    for step in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        save_checkpoint(
            root / "checkpoints", step, model=model, tokenizer=tokenizer, head=head, trainer_state={}
        )
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_run(tmp_path_factory.mktemp("run"), with_head=True)


def _weight_keys(directory: Path) -> list[str]:
    keys = []
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as handle:
            keys += list(handle.keys())
    return keys


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[3, 8, 9, 10, 4, 5, 6]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_round_trip_same_logits_and_no_head_in_the_weights(run_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "exported"
    info = export_checkpoint(run_dir, out)
    final = run_dir / "checkpoints" / "step_000002"
    assert info["step"] == 2 and Path(info["source_checkpoint"]) == final.resolve()

    exported, loading = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    torch.testing.assert_close(_logits(exported), _logits(load_model(str(final / MODEL_DIR))), rtol=0, atol=0)
    # and it is the newest checkpoint, not the first one
    first = load_model(str(run_dir / "checkpoints" / "step_000001" / MODEL_DIR))
    assert not torch.equal(_logits(exported), _logits(first))

    keys = _weight_keys(out)
    assert keys and not any("log_z" in k for k in keys)
    top_level = sorted(f.name for f in out.glob("*.safetensors"))
    assert top_level == ["model.safetensors"], "loaders such as vLLM read every top-level *.safetensors"
    assert (
        load_tokenizer(str(out))("sum 7:")["input_ids"]
        == load_tokenizer(str(final / MODEL_DIR))("sum 7:")["input_ids"]
    )

    # the head sits beside the model and loads into LogZHead
    head_file = out / HEAD_SUBDIR / HEAD_FILE
    saved = load_file(str(final / HEAD_FILE))
    head = LogZHead(TINY["hidden_size"], num_layers=HEAD_LAYERS)
    load_log_z_head(head, head_file)
    assert all(torch.equal(v, saved[LOG_Z_PREFIX + k]) for k, v in head.state_dict().items())
    rebuilt = load_exported_head(out)
    assert rebuilt.num_layers == HEAD_LAYERS and rebuilt.hidden_size == TINY["hidden_size"]
    assert all(torch.equal(v, saved[LOG_Z_PREFIX + k]) for k, v in rebuilt.state_dict().items())
    assert json.loads((out / EXPORT_INFO_FILE).read_text())["log_z_head"]["num_layers"] == HEAD_LAYERS


def test_head_tensors_inside_the_weights_are_removed(run_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "run" / "checkpoints" / "step_000002"
    shutil.copytree(run_dir / "checkpoints" / "step_000002", ckpt)
    weights = ckpt / MODEL_DIR / "model.safetensors"
    tensors = load_file(str(weights))
    tensors[LOG_Z_PREFIX + "layers.0.weight"] = torch.zeros(
        1, TINY["hidden_size"]
    )  # a policy saved with head
    save_file(tensors, str(weights), metadata={"format": "pt"})
    (ckpt / COMPLETE_MARKER).write_text("2\n")  # as older versions wrote it: no manifest to check against

    info = export_checkpoint(ckpt, tmp_path / "out")
    assert info["head_tensors_removed_from_weights"] == 1
    assert not any("log_z" in k for k in _weight_keys(tmp_path / "out"))
    _, loading = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not loading["unexpected_keys"] and not loading["missing_keys"]


def test_run_without_head_exports_only_the_model(tmp_path: Path) -> None:
    run = _save_run(tmp_path / "grpo", with_head=False)
    info = export_checkpoint(run, tmp_path / "out")
    assert info["log_z_head"] is None and not (tmp_path / "out" / HEAD_SUBDIR).exists()
    assert load_exported_head(tmp_path / "out") is None


def test_incomplete_checkpoints_are_skipped_or_refused(run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints" / "step_000001", run / "checkpoints" / "step_000001")
    broken = run / "checkpoints" / "step_000005"
    shutil.copytree(run_dir / "checkpoints" / "step_000002", broken)
    (broken / COMPLETE_MARKER).unlink()  # a save killed before its marker
    assert export_checkpoint(run, tmp_path / "out")["step"] == 1  # the newest *complete* one
    with pytest.raises(ValueError, match=r"incomplete checkpoint.*step_000001"):
        export_checkpoint(broken, tmp_path / "out2")
    shutil.rmtree(run / "checkpoints" / "step_000001")
    with pytest.raises(ValueError, match=r"no complete checkpoint under .*--resume"):
        export_checkpoint(run, tmp_path / "out3")


def test_bad_paths_name_the_fix(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist.*run directory"):
        export_checkpoint(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(ValueError, match="already a Hugging Face model directory"):
        export_checkpoint(run_dir / "base", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a training run directory"):
        export_checkpoint(tmp_path / "empty", tmp_path / "out")

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty.*--overwrite"):
        export_checkpoint(run_dir, taken)
    with pytest.raises(ValueError, match="not a previous flowrl export"):
        export_checkpoint(run_dir, taken, overwrite=True)
    assert (taken / "notes.txt").read_text() == "mine"

    export_checkpoint(run_dir, tmp_path / "out")
    export_checkpoint(run_dir, tmp_path / "out", overwrite=True)  # replacing an export is fine
    assert (tmp_path / "out" / EXPORT_INFO_FILE).is_file()

    assert commands.main(["export", str(tmp_path / "nope"), str(tmp_path / "out4")]) == 2
    assert "flowrl export: error:" in capsys.readouterr().err
    assert commands.main(["export", str(run_dir), str(tmp_path / "out5")]) == 0
    assert "log Z head" in capsys.readouterr().out


def _verl_checkpoint(run_dir: Path, root: Path, *, hf_weights: bool) -> Path:
    """The layout the verl adapter writes (trainer.default_local_dir): global_step_2/actor/ with verl's
    fsdp_config.json, huggingface/ (config and tokenizer; weights only with hf_model in save_contents),
    the head file and its settings. This one is in the shape an older adapter left it: the head inside the
    weights and its flowrl_log_z_* settings in config.json (the export removes both)."""
    step = run_dir / "checkpoints" / "step_000002"
    actor = root / "global_step_2" / "actor"
    shutil.copytree(step / MODEL_DIR, actor / "huggingface")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))
    shutil.copy(step / HEAD_FILE, actor / HEAD_FILE)
    (actor / "log_z_head.json").write_text(json.dumps({"num_layers": HEAD_LAYERS, "dropout": 0.0}))
    (root / "latest_checkpointed_iteration.txt").write_text("2")
    config_path = actor / "huggingface" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "flowrl_log_z_num_layers": HEAD_LAYERS}))
    weights = actor / "huggingface" / "model.safetensors"
    if hf_weights:
        tensors = load_file(str(weights))
        tensors[LOG_Z_PREFIX + "layers.0.weight"] = torch.zeros(1, TINY["hidden_size"])
        save_file(tensors, str(weights), metadata={"format": "pt"})
    else:
        weights.unlink()
    return root


@pytest.mark.parametrize("name", ["default_local_dir", "global_step_2", "actor"])
def test_a_verl_checkpoint_exports_like_a_flowrl_one(
    run_dir: Path, tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """flowrl export takes the verl adapter's checkpoints: its root, a step or the actor directory."""
    from transformers import AutoModelForCausalLM

    root = _verl_checkpoint(run_dir, tmp_path / "verl", hf_weights=True)
    source = {"default_local_dir": root, "global_step_2": root / "global_step_2"}.get(
        name, root / "global_step_2" / "actor"
    )
    assert commands.main(["export", str(source), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    info = json.loads((tmp_path / "out" / EXPORT_INFO_FILE).read_text())
    assert info["step"] == 2 and info["head_tensors_removed_from_weights"] == 1
    assert info["log_z_head"]["dropout"] == 0.0 and info["log_z_head"]["num_layers"] == HEAD_LAYERS
    exported, loading = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(loading[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    step = run_dir / "checkpoints" / "step_000002"
    torch.testing.assert_close(_logits(exported), _logits(load_model(str(step / MODEL_DIR))), rtol=0, atol=0)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert not [k for k in config if k.startswith("flowrl")]
    head = load_exported_head(tmp_path / "out")
    saved = load_file(str(step / HEAD_FILE))
    assert all(torch.equal(v, saved[LOG_Z_PREFIX + k]) for k, v in head.state_dict().items())


def test_verl_checkpoints_export_cannot_do_name_the_fix(run_dir: Path, tmp_path: Path) -> None:
    """Only FSDP shards (no huggingface/ weights) without verl: merging needs verl; LoRA: verl's merger;
    a step that is not there: named."""
    root = _verl_checkpoint(run_dir, tmp_path / "verl", hf_weights=False)
    try:
        import verl  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs verl.*hf_model"):
            export_checkpoint(root, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    (root / "global_step_2" / "actor" / "lora_train_meta.json").write_text("{}")
    with pytest.raises(ValueError, match="LoRA checkpoint.*verl.model_merger merge"):
        export_checkpoint(root, tmp_path / "out")
    (root / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(ValueError, match="global_step_7"):
        export_checkpoint(root, tmp_path / "out")
