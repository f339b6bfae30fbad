"""The chunked log-prob paths of flowrl.policy: the fused nn.Linear path against plain autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flowrl.policy import token_logprobs


def _reference(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, temperature: float):
    """Full logits, plain log_softmax: what every path must equal."""
    logp = torch.log_softmax(head(hidden) / temperature, -1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


class _ScaledHead(nn.Module):
    """A head that is not a plain nn.Linear: must take the general path and still be right."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.linear(x)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_values_entropy_and_gradients_match_autograd(fused: bool, temperature: float, bias: bool) -> None:
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=bias).double()
    hidden = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    weights = torch.randn(23, dtype=torch.float64)  # a non-uniform upstream gradient

    lp, ent = token_logprobs(
        hidden, targets, head, temperature=temperature, chunk_size=5, with_entropy=True, fused=fused
    )
    (lp * weights).sum().backward()
    got = hidden.grad.clone(), head.weight.grad.clone(), None if head.bias is None else head.bias.grad.clone()

    hidden.grad = None
    head.zero_grad()
    want_lp, want_ent = _reference(hidden, targets, head, temperature)
    (want_lp * weights).sum().backward()

    torch.testing.assert_close(lp, want_lp)
    torch.testing.assert_close(ent, want_ent.detach())
    assert not ent.requires_grad
    torch.testing.assert_close(got[0], hidden.grad)
    torch.testing.assert_close(got[1], head.weight.grad)
    if bias:
        torch.testing.assert_close(got[2], head.bias.grad)


def test_fused_gradient_passes_gradcheck() -> None:
    from flowrl.policy import _LinearLogprobs

    torch.manual_seed(1)
    targets = torch.randint(0, 9, (7,))
    inputs = tuple(
        torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in [(7, 6), (9, 6), (9,)]
    )
    assert torch.autograd.gradcheck(
        lambda h, w, b: _LinearLogprobs.apply(h, w, b, targets, 0.8, False)[0], inputs
    )


def test_general_path_for_other_heads_and_tied_weights() -> None:
    torch.manual_seed(2)
    embedding = nn.Embedding(40, 8)
    linear = nn.Linear(8, 40, bias=False)
    linear.weight = embedding.weight  # tied, as in Qwen2.5-0.5B: one parameter, two uses
    hidden = embedding(torch.randint(0, 40, (11,)))
    targets = torch.randint(0, 40, (11,))
    for head in (linear, _ScaledHead(linear)):
        embedding.zero_grad()
        lp, _ = token_logprobs(hidden, targets, head, temperature=1.0, chunk_size=4)
        lp.sum().backward(retain_graph=True)
        got = embedding.weight.grad.clone()
        embedding.zero_grad()
        want, _ = _reference(hidden, targets, head, 1.0)
        want.sum().backward(retain_graph=True)
        torch.testing.assert_close(got, embedding.weight.grad)


def test_bf16_autocast_matches_autograd_under_autocast() -> None:
    torch.manual_seed(3)
    head = nn.Linear(32, 64, bias=False)
    hidden = torch.randn(20, 32, requires_grad=True)
    targets = torch.randint(0, 64, (20,))
    results = []
    # the entropy of the float32 softmax over the bf16 projection (CPU autocast lowers even a dot product)
    logp = torch.log_softmax((hidden.detach().bfloat16() @ head.weight.detach().bfloat16().T).float(), -1)
    want_entropy = -(logp.exp() * logp).sum(-1)
    for fused in (True, False):
        hidden.grad, head.weight.grad = None, None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp, ent = token_logprobs(
                hidden, targets, head, temperature=1.0, chunk_size=8, fused=fused, with_entropy=True
            )
        assert lp.dtype == torch.float32 and ent is not None and ent.dtype == torch.float32
        torch.testing.assert_close(ent, want_entropy, atol=1e-5, rtol=1e-5)
        lp.sum().backward()
        assert hidden.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
        results.append((lp.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_no_grad_and_empty_inputs() -> None:
    head = nn.Linear(4, 10)
    with torch.no_grad():
        lp, ent = token_logprobs(torch.randn(3, 4), torch.tensor([1, 2, 3]), head, temperature=1.0)
    assert lp.shape == (3,) and ent is None
    lp, ent = token_logprobs(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), head, temperature=1.0,
                             with_entropy=True)  # fmt: skip
    assert lp.shape == (0,) and ent is not None and ent.shape == (0,)


# -- models whose forward transforms the projection's output ----------------------------------------

# (model_type, config fields): Gemma 2 soft-caps its logits, Cohere scales them, Granite divides them,
# Llama leaves them alone. Small caps and large scales make the transforms matter at this size.
TRANSFORMED = [
    ("gemma2", {"final_logit_softcapping": 0.5}),
    ("cohere", {"logit_scale": 4.0}),
    ("granite", {"logits_scaling": 0.25}),
    ("llama", {}),
]


def _tiny_causal_lm(model_type: str, fields: dict) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=97, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **fields,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(("model_type", "fields"), TRANSFORMED, ids=[t[0] for t in TRANSFORMED])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_gradients_are_those_of_the_models_own_logits(
    model_type: str, fields: dict, temperature: float
) -> None:
    """What the rollout samples from (the model's forward) is what the trainer's log-probs score."""
    from flowrl.policy import Policy, verify_logprobs

    model = _tiny_causal_lm(model_type, fields)
    policy = Policy(model, logprob_chunk_size=3)
    verify_logprobs(policy)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ours = policy(ids, mask, 4, temperature=temperature).logprobs
    logits = model(input_ids=ids, attention_mask=mask).logits[:, 3:-1] / temperature
    theirs = torch.log_softmax(logits, -1).gather(-1, ids[:, 4:, None]).squeeze(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    weights = [p for p in model.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(ours.sum(), weights)
    g_theirs = torch.autograd.grad(theirs.sum(), weights)
    for a, b in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _qwen2_whose_forward(change: str) -> nn.Module:
    """A tiny Qwen2 whose forward changes its logits in a way no config field says: ``after`` the output
    projection (times 3), or ``before`` it (the hidden states halved, as MiniCPM's forward scales them)."""
    from transformers import Qwen2ForCausalLM

    class Changed(Qwen2ForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):  # type: ignore[no-untyped-def]
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = self.lm_head(hidden * 0.5) if change == "before" else self.lm_head(hidden) * 3.0
            return type("Out", (), {"logits": logits})()

    base = _tiny_causal_lm("qwen2", {})
    model = Changed(base.config)
    model.load_state_dict(base.state_dict())
    return model.eval()


@pytest.mark.parametrize("change", ["after", "before"])
def test_an_unknown_change_to_the_logits_is_refused_naming_the_model_type(change: str) -> None:
    from flowrl.policy import Policy, verify_logprobs

    match = "transforms its output projection" if change == "after" else "log-probs do not reproduce"
    with pytest.raises(ValueError, match=f"qwen2: the model's forward .*{match}"):
        verify_logprobs(Policy(_qwen2_whose_forward(change)))


def test_the_transform_is_the_one_the_model_class_applies_not_only_what_its_config_names() -> None:
    """Gemma 3's multimodal class returns its projection as it is, although its text config names a
    soft-cap (the text-only class applies it): the fitted transform follows the forward."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from flowrl.policy import PLAIN, LogitTransform, Policy, verify_logprobs

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, vocab_size=97, final_logit_softcapping=0.5)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)  # fmt: skip
    config = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                  image_token_index=90, boi_token_index=91, eoi_token_index=92)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    policy = Policy(model)
    assert policy.logit_transform == LogitTransform(softcap=0.5)  # what the config names
    assert verify_logprobs(policy) == PLAIN == policy.logit_transform
    text_only = Policy(_tiny_causal_lm("gemma3_text", {"final_logit_softcapping": 0.5}))
    assert verify_logprobs(text_only) == LogitTransform(softcap=0.5)
