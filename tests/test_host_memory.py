"""Where full fine-tuning's memory goes: an embedding's gradient, and freed host memory."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from flowrl.models import embedding_gradient_in_place
from flowrl.policy import Policy


def _model(tied: bool, pad_token_id: int | None = None) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        pad_token_id=pad_token_id,  # the embedding's padding_idx: a row autograd never updates
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return Qwen2ForCausalLM(cfg)


def _grads(model: Qwen2ForCausalLM, backwards: int) -> dict[str, torch.Tensor]:
    policy = Policy(model, logprob_chunk_size=7)
    gen = torch.Generator().manual_seed(1)
    for _ in range(backwards):  # accumulation across micro-batches, as the trainer does
        ids = torch.randint(0, 300, (3, 12), generator=gen)
        ids[:, ::4] = 0  # the padding token (when there is one) inside prompts and responses
        out = policy(ids, torch.ones_like(ids), 5, with_log_z=False)
        out.logprobs.sum().backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("pad_token_id", [None, 0])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("backwards", [1, 2])
def test_an_embeddings_gradient_added_in_place_equals_autograds(
    tied: bool, backwards: int, pad_token_id: int | None
) -> None:
    dense = _grads(_model(tied=tied, pad_token_id=pad_token_id), backwards)
    model = _model(tied=tied, pad_token_id=pad_token_id)
    assert embedding_gradient_in_place(model)
    in_place = _grads(model, backwards)
    assert dense.keys() == in_place.keys()
    for name, grad in in_place.items():
        torch.testing.assert_close(grad, dense[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_scaled_embedding_gets_its_rows_gradient_times_the_scale(dtype: torch.dtype) -> None:
    """Gemma's embedding multiplies its rows by sqrt(H) (transformers' ``*ScaledWordEmbedding``): the
    gradient added in place carries that factor, as autograd's does (tied to the output head, as
    Gemma's are)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def gemma() -> torch.nn.Module:
        config = AutoConfig.for_model(
            "gemma2", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0,
            attn_implementation="eager", final_logit_softcapping=None,
        )  # fmt: skip
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).to(dtype)

    dense = _grads(gemma(), 2)
    model = gemma()
    emb = model.get_input_embeddings()
    assert type(emb) is not torch.nn.Embedding and float(emb.embed_scale) > 1  # the case at hand
    assert embedding_gradient_in_place(model)
    in_place = _grads(model, 2)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-2}
    for name, grad in in_place.items():
        torch.testing.assert_close(grad.float(), dense[name].float(), **tolerance)


def test_an_embedding_with_another_forward_is_left_to_autograd() -> None:
    class Shifted(torch.nn.Embedding):
        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) + 1.0

    model = _model(tied=False)
    model.set_input_embeddings(Shifted(300, 32))
    assert not embedding_gradient_in_place(model)


def test_an_embedding_alone_still_gets_its_gradient() -> None:
    model = _model(tied=True)
    embedding_gradient_in_place(model)
    emb = model.get_input_embeddings()
    lookup = emb(torch.tensor([[1, 2, 2]]))
    assert lookup.requires_grad and lookup.grad_fn is None  # a leaf: no graph edge to the weight
    lookup.sum().backward()  # no output head in this pass
    expected = torch.zeros_like(emb.weight)
    expected[1], expected[2] = 1.0, 2.0
    torch.testing.assert_close(emb.weight.grad, expected)


def test_frozen_embeddings_are_left_alone() -> None:
    frozen = _model(tied=True)
    frozen.requires_grad_(False)
    assert not embedding_gradient_in_place(frozen)
    assert not frozen.get_input_embeddings()._forward_hooks


def test_embeddings_with_their_own_gradient_rules_are_left_alone() -> None:
    for option in ({"sparse": True}, {"max_norm": 1.0}, {"scale_grad_by_freq": True}):
        model = _model(tied=False)
        model.set_input_embeddings(torch.nn.Embedding(300, 32, **option))
        assert not embedding_gradient_in_place(model), option


@pytest.mark.slow  # a fresh interpreter
@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="no C library found")
def test_large_blocks_go_back_to_the_system_when_freed() -> None:
    """With the threshold fixed, a freed 16 MB tensor leaves the process's resident memory at once, also
    after glibc would have raised its threshold past it (by freeing a larger mapped block)."""
    script = """
import torch
from flowrl.host_memory import return_large_blocks
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
ok = return_large_blocks() if FIX else True
torch.ones(6 << 20).sum()  # 24 MB, mapped and freed: glibc would raise its threshold to it here
before = rss()
t = torch.ones(4 << 20)  # 16 MB
held = rss() - before
del t
print(ok, held, rss() - before)
"""
    out = subprocess.run(
        [sys.executable, "-c", "FIX = True\n" + script], capture_output=True, text=True, check=True
    ).stdout
    ok, held, after = out.split()
    if ok != "True":
        pytest.skip("not glibc: the threshold cannot be set")
    assert int(held) > 15e6
    assert int(after) < 2e6


def test_a_step_too_small_for_bf16_weights_is_counted() -> None:
    """At lr 1e-6 a bf16 weight above 4 * lr / 2^-7 cannot move: counted, and shown to stay put."""
    from flowrl.optim import HostAdamW, weights_an_update_cannot_move

    weight = torch.nn.Parameter(torch.tensor([1e-4, 1e-3, 0.02, -0.5], dtype=torch.bfloat16))
    optimizer = torch.optim.AdamW([weight], lr=1e-6, weight_decay=0.0)
    assert weights_an_update_cannot_move(optimizer) == (3, 4, "bfloat16")
    before = weight.detach().clone()
    weight.grad = torch.ones_like(weight)
    optimizer.step()
    moved = weight.detach() != before
    assert moved.tolist() == [True, False, False, False]  # only the one small enough to resolve 1e-6
    assert weights_an_update_cannot_move(torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])) is None
    host = HostAdamW([{"params": [weight], "lr": 1e-6, "weight_decay": 0.0}], lr=1e-6)
    assert weights_an_update_cannot_move(host) is None  # float32 master weights on the host
