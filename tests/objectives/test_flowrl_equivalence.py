"""The paper's equivalence, checked by exact enumeration on a small categorical policy.

FlowRL (2509.15207) claims that minimizing the trajectory-balance loss is, in expected gradient,
minimizing KL(pi || p*) with p*(y) = exp(beta r(y)) pi_ref(y) / Z. With K outcomes and one-token
"responses" (T = 1, so ell = log pi(y)), both expectations can be summed exactly:

    E_{y ~ pi}[grad (log Z + log pi(y) - beta r(y) - log pi_ref(y))^2]
        = 2 sum_y pi(y) delta(y) grad log pi(y)
        = 2 grad KL(pi || p*)            (since sum_y pi(y) grad log pi(y) = 0, log Z cancels)
"""

from __future__ import annotations

import torch

from flowrl.objectives.flowrl import flowrl_loss

K = 6
BETA = 2.0


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(K, generator=generator, dtype=torch.float64)
    ref_logprobs = torch.log_softmax(torch.randn(K, generator=generator, dtype=torch.float64), 0)
    rewards = torch.rand(K, generator=generator, dtype=torch.float64)
    return logits, ref_logprobs, rewards


def _target_logprobs(ref_logprobs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(BETA * rewards + ref_logprobs, 0)


def _kl_gradient(logits: torch.Tensor, ref_logprobs: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    logits = logits.detach().requires_grad_()
    logprobs = torch.log_softmax(logits, 0)
    kl = (logprobs.exp() * (logprobs - _target_logprobs(ref_logprobs, rewards))).sum()
    (grad,) = torch.autograd.grad(kl, logits)
    return grad


def _expected_flowrl_gradient_on_policy(
    logits: torch.Tensor, ref_logprobs: torch.Tensor, rewards: torch.Tensor, log_z: float
) -> torch.Tensor:
    """sum_y pi(y) grad loss(y): one on-policy FlowRL loss per outcome, weighted by its probability."""
    logits = logits.detach().requires_grad_()
    logprobs = torch.log_softmax(logits, 0)
    expected = torch.zeros(K, dtype=torch.float64)
    for y in range(K):
        token = logprobs[y].view(1, 1)  # one sequence of one token
        loss, _ = flowrl_loss(
            token,
            token.detach(),
            ref_logprobs[y].view(1, 1),
            torch.tensor([log_z], dtype=torch.float64),
            rewards[y].view(1),
            torch.ones(1, 1),
            beta=BETA,
            importance_weight="on_policy",
        )
        (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
        expected += logprobs[y].exp().detach() * grad
    return expected


def _optimal_log_z(logits: torch.Tensor, ref_logprobs: torch.Tensor, rewards: torch.Tensor) -> float:
    """argmin over log Z of E_pi[delta^2]: E_pi[beta r + log pi_ref - log pi]."""
    logprobs = torch.log_softmax(logits, 0)
    return float((logprobs.exp() * (BETA * rewards + ref_logprobs - logprobs)).sum())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_expected_flowrl_gradient_is_twice_the_kl_gradient() -> None:
    for seed in range(3):
        logits, ref_logprobs, rewards = _problem(seed)
        kl_grad = _kl_gradient(logits, ref_logprobs, rewards)
        assert kl_grad.norm() > 1e-2  # far from the target, so the comparison is not trivial
        for log_z in (_optimal_log_z(logits, ref_logprobs, rewards), 0.0, 3.7):
            flowrl_grad = _expected_flowrl_gradient_on_policy(logits, ref_logprobs, rewards, log_z)
            assert _cosine(flowrl_grad, kl_grad) > 0.999
            torch.testing.assert_close(flowrl_grad, 2 * kl_grad)


def test_both_gradients_vanish_at_the_target() -> None:
    _, ref_logprobs, rewards = _problem()
    logits = _target_logprobs(ref_logprobs, rewards)  # pi = p*
    assert _kl_gradient(logits, ref_logprobs, rewards).abs().max() < 1e-12
    flowrl_grad = _expected_flowrl_gradient_on_policy(
        logits, ref_logprobs, rewards, _optimal_log_z(logits, ref_logprobs, rewards)
    )
    assert flowrl_grad.abs().max() < 1e-12


def test_learning_policy_and_log_z_reaches_the_target_and_its_partition_function() -> None:
    # Enumerate every outcome once as if sampled from a uniform proposal q = 1/K: old_logprobs = -log K
    # gives importance weights w = pi / q = K pi, so the batch loss is sum_y pi(y) delta(y)^2 exactly.
    logits, ref_logprobs, rewards = _problem()
    logits = logits.clone().requires_grad_()
    log_z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([logits, log_z], lr=0.05)
    outcomes = torch.arange(K)
    for _ in range(600):
        logprobs = torch.log_softmax(logits, 0)
        loss, _ = flowrl_loss(
            logprobs[outcomes].view(K, 1),
            torch.full((K, 1), -torch.log(torch.tensor(float(K), dtype=torch.float64)).item()),
            ref_logprobs.view(K, 1),
            log_z.expand(K),
            rewards,
            torch.ones(K, 1),
            beta=BETA,
            importance_weight="none",
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    logprobs = torch.log_softmax(logits.detach(), 0)
    target = _target_logprobs(ref_logprobs, rewards)
    kl = float((logprobs.exp() * (logprobs - target)).sum())
    assert kl < 1e-4
    # at the optimum delta = 0 everywhere: log Z = log sum_y exp(beta r(y)) pi_ref(y)
    true_log_z = float(torch.logsumexp(BETA * rewards + ref_logprobs, 0))
    assert abs(log_z.item() - true_log_z) < 1e-2
