"""LoRA runs through peft, end to end on a tiny model: the reference is the base itself, the base stays
frozen while adapters and head train, resume is exact, exports load as plain models, eval takes them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowrl import commands
from flowrl.checkpoint import ADAPTER_DIR, HEAD_FILE, MODEL_DIR, latest_checkpoint
from flowrl.config import load_config
from flowrl.evaluation.run import resolve_model
from flowrl.logging import read_metrics
from flowrl.models import AdaptersDisabled, merged_weights
from flowrl.policy import Policy, is_peft_model, load_model
from flowrl.trainer import Trainer
from tests.conftest import trainer_overrides, write_config

LORA = {
    "model.lora.rank": 4,
    "model.lora.alpha": 8,
    "optim.lr": 5e-2,
    "reward.function": "tests.helpers.flaky_rewards:slow_digit_share",
}


def lora_overrides(model_dir: Path, data_file: Path, out: Path, **extra: object) -> list[str]:
    return trainer_overrides(model_dir, data_file, out, **{**LORA, **extra})


def base_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(next(model_dir.glob("*.safetensors"))))


def test_lora_trains_adapters_and_head_with_the_base_frozen_and_as_reference(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    cfg = load_config(
        None, lora_overrides(model_dir, data_file, tmp_path / "run", **{"model.dtype": "bfloat16"})
    )
    trainer = Trainer(cfg)
    model = trainer.policy.model
    assert is_peft_model(model) and isinstance(trainer.ref_policy, AdaptersDisabled)
    trainable = {n: p for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("log_z_head.") for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values()), "adapters and head in float32"
    frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen), "the base in bfloat16"
    assert not any("log_z" in n for n, _ in model.named_parameters()), "the head is never wrapped"
    assert not any("lm_head" in n and "lora_" in n for n in trainable), "nor the output head"
    optimizer_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimizer_params == {id(p) for p in trainable.values()}
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}

    result = trainer.fit()
    assert len(result.metrics) == 2
    after = dict(trainer.policy.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed == set(trainable), "exactly the adapters and the head moved"
    assert all(s["exp_avg"].dtype == torch.float32 for s in trainer.optimizer.state.values())

    # the reference, adapters off, is the base model exactly (same forward, bf16 weights)
    base = Policy(load_model(str(model_dir), dtype="bfloat16")).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = trainer.ref_policy.eval()(ids, mask, 3).logprobs
        want = base(ids, mask, 3).logprobs
        trained = trainer.policy.eval()(ids, mask, 3).logprobs
    assert torch.equal(ref, want)
    assert not torch.equal(trained, want), "the adapters changed the policy"


def test_lora_resume_is_exact_and_checkpoints_hold_adapters_only(
    model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    straight = tmp_path / "straight"
    cfg = write_config(
        tmp_path / "s.yaml", lora_overrides(model_dir, data_file, straight, **{"train.save_every": 1})
    )
    assert commands.main(["train", str(cfg), "train.total_steps=3"]) == 0
    split = tmp_path / "split"
    cfg2 = write_config(
        tmp_path / "p.yaml", lora_overrides(model_dir, data_file, split, **{"train.save_every": 1})
    )
    assert commands.main(["train", str(cfg2), "train.total_steps=1"]) == 0
    assert commands.main(["train", str(cfg2), "train.total_steps=3", "--resume"]) == 0

    a, b = read_metrics(straight / "metrics.jsonl"), read_metrics(split / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b, strict=True):
        assert x["actor/loss"] == pytest.approx(y["actor/loss"], rel=1e-5)
    last_a, last_b = latest_checkpoint(straight / "checkpoints"), latest_checkpoint(split / "checkpoints")
    assert not (last_a / MODEL_DIR).exists() and (last_a / ADAPTER_DIR / "adapter_config.json").is_file()
    for name in ("adapter_model.safetensors",):
        ta, tb = load_file(str(last_a / ADAPTER_DIR / name)), load_file(str(last_b / ADAPTER_DIR / name))
        assert ta.keys() == tb.keys() and all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)
        assert all("lora_" in k for k in ta) and not any("log_z" in k for k in ta)
    head_a, head_b = load_file(str(last_a / HEAD_FILE)), load_file(str(last_b / HEAD_FILE))
    assert all(torch.allclose(head_a[k], head_b[k], atol=1e-6) for k in head_a)
    size = sum(p.stat().st_size for p in (last_a / ADAPTER_DIR).glob("*.safetensors"))
    assert size < sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2


def test_lora_export_merges_into_a_plain_model_or_writes_the_adapter(
    model_dir: Path, data_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    assert (
        commands.main(
            ["train", str(write_config(tmp_path / "c.yaml", lora_overrides(model_dir, data_file, run)))]
        )
        == 0
    )
    assert commands.main(["export", str(run), str(tmp_path / "merged")]) == 0
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    keys = load_file(str(tmp_path / "merged" / "model.safetensors")).keys()
    assert not any("lora_" in k or "log_z" in k or "base_layer" in k for k in keys)
    assert (tmp_path / "merged" / "log_z_head" / HEAD_FILE).is_file()
    assert json.loads((tmp_path / "merged" / "flowrl_export.json").read_text())["format"] == "merged model"

    assert commands.main(["export", str(run), str(tmp_path / "adapter"), "--adapter"]) == 0
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-4)
        plain = AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits
    assert not torch.allclose(merged(ids).logits, plain, atol=1e-4), "the adapters are in the export"

    # what vLLM is sent: the merged weights under the plain model's names; the model stays unmerged
    cfg = load_config(None, lora_overrides(model_dir, data_file, run, **{"train.total_steps": 2}))
    peft_model = Trainer(cfg, resume=True).policy.model
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    sent = {name: tensor.clone() for name, tensor in merged_weights(peft_model)}
    exported = merged.state_dict()
    assert set(sent) == set(exported)
    for name, tensor in sent.items():
        torch.testing.assert_close(tensor, exported[name], atol=1e-6, rtol=1e-5)
    assert all(torch.equal(before[n], p) for n, p in peft_model.named_parameters())
    capsys.readouterr()

    # eval takes the run: the checkpoint's adapters load as their merged base model
    spec = resolve_model(str(run))
    assert spec.path.endswith(ADAPTER_DIR)
    loaded = load_model(spec.path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-4)
