"""The optimizer's steps in backward (``train.optimizer_in_backward``) and the clipping switch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from flowrl import sharding
from flowrl.config import load_config
from flowrl.data import synthetic
from flowrl.logging import read_metrics
from flowrl.optim import StepInBackward
from flowrl.trainer import Trainer
from tests.conftest import TINY
from tests.conftest import trainer_overrides as overrides

IN_BACKWARD = {"optim.max_grad_norm": 0, "train.micro_batch_size": 8, "train.sample_every": 0}


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _optimizer(model: nn.Sequential) -> torch.optim.AdamW:
    groups = [  # two groups with their own settings, as the policy's and the head's
        {"name": "policy", "params": [*model[0].parameters(), *model[2].parameters()], "weight_decay": 0.1},
        {"name": "log_z_head", "params": list(model[4].parameters()), "lr": 3e-2, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=1e-2, fused=True)


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(step))
    return model(x).square().mean()


def test_steps_in_backward_equal_one_step_after_it() -> None:
    plain, stepped = _mlp(), _mlp()
    opt_a, opt_b = _optimizer(plain), _optimizer(stepped)
    sched_a, sched_b = (torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (s + 1)) for o in (opt_a, opt_b))
    stepper = StepInBackward(opt_b)
    for step in range(4):
        _loss(plain, step).backward()
        norm = sharding.grad_norm(list(plain.parameters()))
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        with stepper.backward():
            _loss(stepped, step).backward()
        assert all(p.grad is None for p in stepped.parameters())  # each freed after its step
        torch.testing.assert_close(stepper.grad_norm(list(stepped.parameters())), norm)
        sched_a.step()
        sched_b.step()
    for a, b in zip(plain.parameters(), stepped.parameters(), strict=True):
        assert torch.equal(a, b)
    saved_a, saved_b = opt_a.state_dict(), opt_b.state_dict()  # a checkpoint holds the same
    assert saved_a["param_groups"] == saved_b["param_groups"]
    assert sorted(saved_a["state"]) == sorted(saved_b["state"]) == list(range(6))
    for index, state in saved_a["state"].items():
        assert all(torch.equal(value, saved_b["state"][index][key]) for key, value in state.items())


def test_gradients_are_freed_as_backward_goes() -> None:
    model = _mlp()
    stepper = StepInBackward(_optimizer(model))
    seen = {}

    def at_first_layer(module: nn.Module, grad_output: tuple) -> None:  # the last layer backward reaches
        seen["later layers' gradients"] = [p.grad for m in (model[2], model[4]) for p in m.parameters()]
        seen["later layers' steps"] = [int(stepper.optimizer.state[model[4].weight]["step"])]

    model[0].register_full_backward_pre_hook(at_first_layer)
    with stepper.backward():
        _loss(model, 0).backward()
    assert seen["later layers' gradients"] == [None] * 4  # stepped and released before layer 0's formed
    assert seen["later layers' steps"] == [1]


def test_hooks_do_nothing_outside_the_context() -> None:
    model = _mlp()
    StepInBackward(_optimizer(model))  # its hooks are registered, and not armed
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, 0).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_gradient_completed_after_backward_is_stepped_once_after_it() -> None:
    model = _mlp()
    late = model[0].weight
    stepper = StepInBackward(_optimizer(model), after_backward=[late])
    reference = _mlp()
    opt = _optimizer(reference)
    extra = torch.full_like(late, 0.5)

    def add_late(_: torch.Tensor) -> None:  # a gradient part added outside autograd at the end
        late.grad.add_(extra)

    handle = late.register_post_accumulate_grad_hook(add_late)
    with stepper.backward():
        _loss(model, 0).backward()
    handle.remove()
    _loss(reference, 0).backward()
    reference[0].weight.grad.add_(extra)
    opt.step()
    for a, b in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert int(stepper.optimizer.state[late]["step"]) == 1


def test_a_gradient_arriving_in_two_parts_is_refused() -> None:
    shared = nn.Linear(4, 4)
    stepper = StepInBackward(torch.optim.AdamW(shared.parameters(), lr=1e-2))
    x = torch.randn(2, 4, requires_grad=True)
    y = checkpoint(shared, checkpoint(shared, x, use_reentrant=True), use_reentrant=True)
    with pytest.raises(RuntimeError, match="two parts.*optimizer_in_backward=false"), stepper.backward():
        y.sum().backward()


@pytest.mark.parametrize("max_norm", [0, None])
def test_no_clipping_leaves_the_gradients(max_norm: float | None) -> None:
    p = nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 10.0)
    assert float(sharding.clip_grad_norm_([p], max_norm)) == pytest.approx(20.0)
    assert torch.equal(p.grad, torch.full((4,), 10.0))


@pytest.fixture(scope="module")
def untied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its own output head (as Qwen2.5-7B): the input embedding is the one
    gradient completed after autograd's."""
    from transformers import AutoModelForCausalLM

    directory = synthetic.save_tiny_model(tmp_path_factory.mktemp("untied") / "model", seed=0, **TINY)
    model = AutoModelForCausalLM.from_pretrained(directory)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("tied", {}),
        ("untied", {}),
        ("tied", {"model.gradient_checkpointing": "true", "algorithm.name": "grpo"}),
        ("untied", {"model.lora.rank": 4}),
    ],
    ids=["tied", "untied", "checkpointing-grpo", "lora"],
)
def test_trainer_in_backward_equals_the_plain_step(
    model: str, extra: dict, model_dir: Path, untied_model_dir: Path, data_file: Path, tmp_path: Path
) -> None:
    path = model_dir if model == "tied" else untied_model_dir
    runs = {}
    for in_backward in (False, True):
        items = overrides(
            path,
            data_file,
            tmp_path / str(in_backward),
            **IN_BACKWARD,
            **extra,
            **{"train.optimizer_in_backward": in_backward, "train.total_steps": 3},
        )
        trainer = Trainer(load_config(None, items))
        assert (trainer.actor.stepper is not None) == in_backward
        before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
        metrics = trainer.fit().metrics
        runs[in_backward] = (metrics, {n: p.detach().clone() for n, p in trainer.policy.named_parameters()})
    (plain, plain_w), (stepped, stepped_w) = runs[False], runs[True]
    for a, b in zip(plain, stepped, strict=True):
        for key in ("actor/loss", "optim/grad_norm", "flowrl/log_z_grad_norm", "reward/mean"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-6), key
    for name, value in plain_w.items():
        assert torch.equal(stepped_w[name], value), name
    assert any(
        not torch.equal(before[n], v) for n, v in stepped_w.items() if "lora_" in n or "lora" not in model
    )


def test_resume_in_backward_equals_straight_run(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    # a learning rate that changes every step (warm-up, then cosine), a head with its own
    common = {**IN_BACKWARD, "train.optimizer_in_backward": "true", "train.save_every": 2}
    common |= {"optim.warmup_steps": 2, "optim.schedule": "cosine"}

    def run(out: Path, steps: int, resume: bool = False) -> None:
        items = overrides(model_dir, data_file, out, **common, **{"train.total_steps": steps})
        Trainer(load_config(None, items), resume=resume).fit()

    run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    run(tmp_path / "resumed", 4, resume=True)
    a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    b = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for key in ("actor/loss", "optim/grad_norm", "flowrl/log_z", "reward/mean"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), (ra["step"], key)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"optim.max_grad_norm": 1.0}, "optim.max_grad_norm=0"),
        ({"train.micro_batch_size": 4}, "train.micro_batch_size to train.mini_batch_size (8)"),
        ({"train.offload_optimizer": "true"}, "choose one"),
        ({"train.strategy": "fsdp2"}, "train.optimizer_in_backward=false"),
    ],
    ids=["clipping", "accumulation", "offload", "fsdp2"],
)
def test_what_in_backward_cannot_do_is_refused_naming_the_fix(
    change: dict, named: str, tmp_path: Path
) -> None:
    items = overrides(
        tmp_path, tmp_path / "x.jsonl", tmp_path, **{**IN_BACKWARD, "train.optimizer_in_backward": "true"}
    )
    with pytest.raises(ValueError, match="optimizer_in_backward") as info:
        load_config(None, [*items, *(f"{k}={v}" for k, v in change.items())])
    assert named in str(info.value)


def test_negative_clipping_norm_is_refused(tmp_path: Path) -> None:
    items = overrides(tmp_path, tmp_path / "x.jsonl", tmp_path, **{"optim.max_grad_norm": -1})
    with pytest.raises(ValueError, match="0 / null for no clipping"):
        load_config(None, items)
