"""The paper's illustrative experiment (FlowRL, arXiv 2509.15207, Figure 1): matching vs maximizing.

The experiment. The "responses" are the 101 states {0, ..., 100}; the policy is a categorical
distribution ``pi_theta = softmax(logits)`` with one free logit per state (a 101-parameter tabular
policy, initialised uniform). The target ``p*`` is a mixture of discrete Gaussian bumps (by default
three separated modes at 20, 50 and 80, the middle one carrying twice the mass of the others), and the
reward of a state is its log-density, ``r(x) = log p*(x)``. Every method samples ``samples_per_step``
states per step from the current policy, scores them and takes one Adam step on its own loss; all
methods get the same number of steps, samples per step, learning rate and sampling seed. Each sample is
a one-token "sequence" (T = 1, ``response_mask`` all ones), so the losses are exactly the LLM losses of
:mod:`flowrl.objectives`; nothing here re-implements their math.

- ``flowrl``: :func:`flowrl.objectives.flowrl_loss` with beta = 1, a uniform reference
  (``ref_logprobs = log(1/101)``), the *raw* reward as the advantage and a scalar learned log Z.
  The target of the trajectory-balance loss is then ``exp(r) * pi_ref / Z``, which is ``p*`` itself, so
  distribution matching can recover every mode (and log Z should converge to ``log(1/101)``, the mass
  of ``exp(r) * pi_ref``). The paper's LLM setting uses group-normalized rewards and beta = 15; with
  group normalization the optimum would be a tempered ``p*``, not ``p*``, so the toy departs from it.
- ``flowrl_group``: the same loss with no learned log Z: each step's log Z is the group estimate
  :func:`flowrl.objectives.group_log_z` over the step's samples (one prompt, one group), the value that
  minimizes the step's loss (``log_z.mode=group`` of the trainer). Not in the default run (the paper's
  figure); ``--methods flowrl,flowrl_group,grpo`` compares it.
- ``grpo``: GRPO (arXiv 2402.03300) with the step's samples as one group, no KL term.
- ``reinforce_pp``: REINFORCE++ (arXiv 2501.03262), batch-whitened returns with a small k1 KL penalty
  towards the uniform reference.
- ``ppo``: PPO-clip (arXiv 1707.06347) with the GAE (arXiv 1506.02438) of a one-token episode, i.e.
  ``r - V`` against a learned scalar value baseline ``V`` (trained with the clipped value loss),
  whitened over the batch as verl's PPO does.

The reward maximizers maximize ``E_pi[log p*(x)]``, whose optimum is a point mass on the highest state
of ``p*``: they collapse onto one mode, which is the paper's point (it reports KL 0.11 for FlowRL and
8.68 for the reward maximizers; its exact setup is not published, so the numbers here differ).
Every method does one update per batch, so old log-probs equal the current ones (ratio 1).

The table. For each method, after training:

- ``KL(target||policy)`` = sum_x p*(x) log(p*(x) / pi(x)), the paper's figure of merit: large when
  the policy misses mass the target has (a missed mode costs about its mass times the log of how much
  it was under-weighted).
- ``KL(policy||target)``: the reverse direction, the quantity FlowRL minimizes; small for a collapsed
  policy that sits on a high-density state, so it does not reveal collapse on its own.
- ``modes covered``: a mode at centre c counts as covered when the policy puts at least a quarter of
  the target's mass on the window [c - 2 width, c + 2 width].

Run it with ``flowrl toy`` (a few seconds on one CPU core; the command is :mod:`flowrl.commands.toy`):
``--plot PATH`` draws the target and each method's final policy like the paper's Figure 1 and ``--json
PATH`` saves the numbers. From Python: ``run_toy(ToyConfig(...))``, then :func:`format_table` and
:func:`plot_toy`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowrl.objectives.advantages import gae, group_normalized_rewards, reinforce_pp_advantages
from flowrl.objectives.flowrl import flowrl_loss, group_log_z
from flowrl.objectives.grpo import grpo_loss
from flowrl.objectives.masked import masked_whiten
from flowrl.objectives.ppo import clipped_surrogate, value_loss
from flowrl.objectives.reinforce_pp import reinforce_pp_loss

NUM_STATES = 101
"""The states are {0, ..., NUM_STATES - 1}, the 1-D space of the paper's Figure 1."""

METHODS: tuple[str, ...] = ("flowrl", "flowrl_group", "grpo", "reinforce_pp", "ppo")
"""The methods of the experiment, in the order of the table."""

DEFAULT_METHODS: tuple[str, ...] = ("flowrl", "grpo", "reinforce_pp", "ppo")
"""The methods of the paper's Figure 1, which ``flowrl toy`` runs by default."""

METHOD_LABELS: dict[str, str] = {
    "flowrl": "FlowRL",
    "flowrl_group": "FlowRL-group",
    "grpo": "GRPO",
    "reinforce_pp": "REINFORCE++",
    "ppo": "PPO",
}

METHOD_COLORS: dict[str, str] = {
    "flowrl": "#D55E00",  # vermillion
    "flowrl_group": "#E69F00",  # orange: FlowRL with the group estimate of log Z instead of a head
    "grpo": "#0072B2",  # blue
    "reinforce_pp": "#CC79A7",  # reddish purple
    "ppo": "#009E73",  # bluish green
    "reference": "#999999",  # grey: the reference / SFT policy RL starts from
    "target": "#000000",  # black: the distribution FlowRL is meant to match
}
"""One colour per method (Okabe-Ito, readable with colour-blindness), shared by every plot: the toy's
and ``flowrl demo``'s, so a method keeps its colour in every panel and every figure."""

FLOWRL_BETA = 1.0
"""beta = 1 with the raw log-density reward makes the trajectory-balance target exactly p* (see above)."""

REINFORCE_PP_KL_COEF = 1e-3
"""REINFORCE++'s per-token KL coefficient (the verl default that REINFORCE++ runs use)."""

CLIP_EPS = 0.2
"""PPO / GRPO / REINFORCE++ ratio clip (1707.06347); inactive here since every batch is used once."""

GAE_LAMBDA = 0.95
"""GAE lambda (1506.02438); irrelevant for one-token episodes, where the advantage is r - V."""

COVERAGE_WINDOW_WIDTHS = 2.0
"""A mode's window is its centre +- this many widths."""

COVERAGE_FRACTION = 0.25
"""A mode is covered when the policy's mass on its window is at least this fraction of the target's."""


@dataclass(frozen=True)
class ToyConfig:
    """Configuration of ``flowrl toy``; validated on construction (errors name the fix)."""

    modes: tuple[int, ...] = (20, 50, 80)
    """Centres of the target's Gaussian bumps, states in 0..100."""
    weights: tuple[float, ...] = (1.0, 2.0, 1.0)
    """Relative probability mass of each bump (one positive number per mode)."""
    width: float = 5.0
    """Standard deviation of every bump, in states (5 keeps the default modes well separated)."""
    steps: int = 1000
    """Optimizer steps per method (one batch, one update each)."""
    samples_per_step: int = 32
    """States sampled from the policy per step (the GRPO group size)."""
    lr: float = 0.05
    """Adam learning rate, shared by the policy logits and the method's scalar (log Z or value)."""
    seed: int = 0
    """Seed of the sampling generator; every method starts from the same seed."""
    methods: tuple[str, ...] = DEFAULT_METHODS
    """Which methods to run, a subset of ``METHODS``."""

    def __post_init__(self) -> None:
        if not self.modes:
            raise ValueError("modes is empty: give at least one mode, e.g. --modes 20,50,80")
        bad_modes = [m for m in self.modes if not 0 <= m < NUM_STATES]
        if bad_modes:
            raise ValueError(
                f"modes {bad_modes} lie outside the states 0..{NUM_STATES - 1}: pick centres in 0..100"
            )
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes {list(self.modes)} repeat a centre: list each mode once")
        if len(self.weights) != len(self.modes):
            raise ValueError(
                f"got {len(self.weights)} weights for {len(self.modes)} modes: give one weight per mode, "
                f"e.g. --weights {','.join(['1'] * len(self.modes))}"
            )
        if not all(math.isfinite(w) and w > 0 for w in self.weights):
            raise ValueError(f"weights {list(self.weights)} must all be positive finite numbers, e.g. 1,2,1")
        if not (math.isfinite(self.width) and self.width > 0):
            raise ValueError(f"width {self.width} must be a positive number of states, e.g. --width 5")
        if self.steps < 1:
            raise ValueError(f"steps {self.steps} must be at least 1")
        if self.samples_per_step < 2:
            raise ValueError(
                f"samples_per_step {self.samples_per_step} must be at least 2 "
                "(GRPO normalizes within the step's group)"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr {self.lr} must be a positive number, e.g. --lr 0.05")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(
                f"methods {list(self.methods)} must be distinct names from {','.join(METHODS)}, "
                f"e.g. --methods {','.join(METHODS)}"
            )


def target_log_probs(modes: Sequence[int], weights: Sequence[float], width: float) -> Tensor:
    """Log-density of the mixture of discrete Gaussian bumps over the states 0..100.

    Each bump is a Gaussian of standard deviation ``width`` evaluated at the integer states and
    normalized over them, so a mode's weight is its probability mass (a bump cut by the edge of the
    space keeps its full mass). Computed in log space so that narrow bumps do not underflow.

    Args:
        modes: (K,) centres of the bumps.
        weights: (K,) positive relative masses.
        width: the bumps' standard deviation, in states.

    Returns:
        (NUM_STATES,) float64 log p*(x), normalized: ``log_p.exp().sum() == 1``.
    """
    states = torch.arange(NUM_STATES, dtype=torch.float64)  # (S,)
    centres = torch.tensor(modes, dtype=torch.float64).unsqueeze(1)  # (K, 1)
    log_bumps = -0.5 * ((states - centres) / width) ** 2  # (K, S)
    log_bumps = log_bumps - torch.logsumexp(log_bumps, dim=1, keepdim=True)
    mixture = torch.tensor(weights, dtype=torch.float64)
    log_mixture = (mixture / mixture.sum()).log().unsqueeze(1)  # (K, 1)
    return torch.logsumexp(log_mixture + log_bumps, dim=0)


def kl_divergence(log_p: Tensor, log_q: Tensor) -> float:
    """KL(p||q) = sum_x p(x) (log p(x) - log q(x)) of two distributions given as (S,) log-probabilities."""
    p = log_p.exp()
    return float((p * (log_p - log_q)).sum())


def mode_windows(modes: Sequence[int], width: float) -> list[tuple[int, int]]:
    """The inclusive state window [c - 2 width, c + 2 width] of each mode, clipped to the space."""
    half = COVERAGE_WINDOW_WIDTHS * width
    return [(max(0, math.ceil(c - half)), min(NUM_STATES - 1, math.floor(c + half))) for c in modes]


def modes_covered(policy_probs: Tensor, target_probs: Tensor, modes: Sequence[int], width: float) -> int:
    """Number of modes whose window holds at least a quarter of the target's mass under the policy.

    Args:
        policy_probs: (S,) the policy's probabilities.
        target_probs: (S,) the target's probabilities.
        modes: (K,) the target's mode centres.
        width: the bumps' standard deviation.
    """
    covered = 0
    for lo, hi in mode_windows(modes, width):
        policy_mass = float(policy_probs[lo : hi + 1].sum())
        target_mass = float(target_probs[lo : hi + 1].sum())
        covered += policy_mass >= COVERAGE_FRACTION * target_mass
    return covered


def _method_loss(
    method: str,
    logprobs: Tensor,
    rewards: Tensor,
    log_z: Tensor,
    value: Tensor,
) -> Tensor:
    """One batch's loss for ``method``, every term from :mod:`flowrl.objectives`.

    Args:
        method: one of ``METHODS``.
        logprobs: (N, 1) log pi_theta of the sampled states (one-token sequences), with gradient.
        rewards: (N,) log p* of the sampled states.
        log_z: () the learned log partition function (used by flowrl); flowrl_group writes its
            estimate into it (without gradient), so the caller can read it.
        value: () the learned value baseline (used by ppo).
    """
    num_samples = logprobs.shape[0]
    response_mask = torch.ones_like(logprobs)  # (N, 1)
    old_logprobs = logprobs.detach()  # one update per batch: the sampling policy is the current one
    ref_logprobs = torch.full_like(logprobs, -math.log(NUM_STATES))  # uniform reference
    if method in ("flowrl", "flowrl_group"):
        options = dict(beta=FLOWRL_BETA, importance_weight="clamp")
        if method == "flowrl":
            log_z_per_sample = log_z.expand(num_samples)
        else:  # the step's samples are one prompt's group
            log_z_per_sample = group_log_z(
                logprobs, old_logprobs, ref_logprobs, rewards, response_mask,
                num_samples_per_prompt=num_samples, **options,
            )  # fmt: skip
            with torch.no_grad():
                log_z.copy_(log_z_per_sample[0])
        loss, _ = flowrl_loss(
            logprobs, old_logprobs, ref_logprobs, log_z_per_sample, rewards, response_mask, **options
        )
        return loss
    if method == "grpo":
        advantages = group_normalized_rewards(rewards, num_samples_per_prompt=num_samples)
        loss, _ = grpo_loss(
            logprobs, old_logprobs, ref_logprobs, advantages, response_mask, clip_eps=CLIP_EPS, kl_coef=0.0
        )
        return loss
    if method == "reinforce_pp":
        advantages = reinforce_pp_advantages(
            rewards,
            response_mask,
            old_logprobs,
            ref_logprobs,
            kl_coef=REINFORCE_PP_KL_COEF,
            kl_estimator="k1",
        )
        loss, _ = reinforce_pp_loss(logprobs, old_logprobs, advantages, response_mask, clip_eps=CLIP_EPS)
        return loss
    if method == "ppo":
        values = value.expand(num_samples, 1)  # (N, 1) V of the single state before the one token
        token_rewards = rewards.unsqueeze(1)  # (N, 1) the reward arrives on the only token
        advantages, returns = gae(token_rewards, values.detach(), response_mask, gamma=1.0, lam=GAE_LAMBDA)
        advantages = masked_whiten(advantages, response_mask)  # as verl's PPO does after GAE
        policy_loss, _ = clipped_surrogate(
            logprobs, old_logprobs, advantages, response_mask, clip_eps=CLIP_EPS
        )
        critic_loss, _ = value_loss(values, values.detach(), returns, response_mask)
        return policy_loss + critic_loss
    raise ValueError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")


def train_policy(method: str, target_log_p: Tensor, cfg: ToyConfig) -> tuple[Tensor, dict[str, float]]:
    """Train a uniform-initialised categorical policy with ``method`` towards the target's reward.

    The loop: sample ``samples_per_step`` states from the current policy, reward them with
    ``log p*``, take one Adam step on the method's loss.

    Args:
        method: one of ``METHODS``.
        target_log_p: (S,) float64 log p*, the reward table.
        cfg: the experiment's configuration.

    Returns:
        (S,) float64 final log pi_theta, and the final scalars ``{"log_z": .., "value": ..}`` (for
        flowrl_group, ``log_z`` is the last step's group estimate).
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    logits = nn.Parameter(torch.zeros(NUM_STATES))  # uniform initial policy
    log_z = nn.Parameter(torch.zeros(()))  # flowrl's scalar partition function
    value = nn.Parameter(torch.zeros(()))  # ppo's scalar value baseline
    extra = {"flowrl": [log_z], "ppo": [value]}.get(method, [])
    optimizer = torch.optim.Adam([logits, *extra], lr=cfg.lr)
    reward_table = target_log_p.float()
    for _ in range(cfg.steps):
        log_policy = torch.log_softmax(logits, dim=0)  # (S,)
        with torch.no_grad():
            states = torch.multinomial(
                log_policy.exp(), cfg.samples_per_step, replacement=True, generator=generator
            )
        logprobs = log_policy[states].unsqueeze(1)  # (N, 1)
        loss = _method_loss(method, logprobs, reward_table[states], log_z, value)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    final = torch.log_softmax(logits.detach().double(), dim=0)
    return final, {"log_z": float(log_z.detach()), "value": float(value.detach())}


def run_toy(cfg: ToyConfig, *, verbose: bool = False) -> dict:
    """Run every method of ``cfg`` and measure its final policy against the target.

    Args:
        cfg: the experiment's configuration.
        verbose: print one line per method as it finishes.

    Returns:
        A JSON-serializable dict: ``"methods"`` maps each method to ``{"kl_target_policy",
        "kl_policy_target", "modes_covered"}``; ``"config"`` is the configuration, ``"target"`` the
        target's probabilities, ``"policies"`` each final policy's probabilities, ``"num_modes"`` the
        number of modes, ``"flowrl_log_z"`` FlowRL's learned log Z (when flowrl ran) and
        ``"flowrl_group_log_z"`` the last group estimate (when flowrl_group ran). Deterministic for a
        given configuration.
    """
    target_log_p = target_log_probs(cfg.modes, cfg.weights, cfg.width)
    target_probs = target_log_p.exp()
    result: dict = {
        "config": asdict(cfg),
        "num_modes": len(cfg.modes),
        "target": target_probs.tolist(),
        "methods": {},
        "policies": {},
    }
    # The tensors are tiny: one thread avoids intra-op scheduling overhead and keeps runs bit-identical.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in cfg.methods:
            start = time.perf_counter()
            policy_log_p, scalars = train_policy(method, target_log_p, cfg)
            policy_probs = policy_log_p.exp()
            result["methods"][method] = {
                "kl_target_policy": kl_divergence(target_log_p, policy_log_p),
                "kl_policy_target": kl_divergence(policy_log_p, target_log_p),
                "modes_covered": modes_covered(policy_probs, target_probs, cfg.modes, cfg.width),
            }
            result["policies"][method] = policy_probs.tolist()
            if method in ("flowrl", "flowrl_group"):
                result[f"{method}_log_z"] = scalars["log_z"]
            if verbose:
                print(
                    f"{METHOD_LABELS[method]:<12} {cfg.steps} steps | {time.perf_counter() - start:.1f}s",
                    flush=True,
                )
    finally:
        torch.set_num_threads(previous_threads)
    return result


def format_table(result: dict) -> str:
    """The table printed by ``flowrl toy``: one row per method."""
    num_modes = result["num_modes"]
    lines = [f"{'method':<12} {'KL(target||policy)':>18} {'KL(policy||target)':>18} {'modes covered':>13}"]
    for method, row in result["methods"].items():
        lines.append(
            f"{METHOD_LABELS[method]:<12} {row['kl_target_policy']:>18.3f} {row['kl_policy_target']:>18.3f} "
            f"{str(row['modes_covered']) + '/' + str(num_modes):>13}"
        )
    return "\n".join(lines)


def toy_figure(result: dict) -> Any:
    """The figure of :func:`plot_toy`: one panel per method, the target shaded behind its final policy.

    Every policy is drawn in its method's colour of :data:`METHOD_COLORS`, the target in the map's
    target colour (shaded). Returns the matplotlib figure; the caller closes it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["methods"])
    states = list(range(NUM_STATES))
    # A shared axis scaled to the target: a collapsed policy's spike is cut off and labelled instead of
    # flattening the target to an invisible line.
    top = 1.6 * max(result["target"])
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.4), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        row, policy = result["methods"][method], result["policies"][method]
        ax.fill_between(
            states, result["target"], step="mid", color=METHOD_COLORS["target"], alpha=0.2, label="target p*"
        )
        ax.step(states, policy, where="mid", color=METHOD_COLORS[method], label=METHOD_LABELS[method])
        peak = max(range(NUM_STATES), key=policy.__getitem__)
        if policy[peak] > top:
            ax.annotate(
                f"peak {policy[peak]:.2f} at x={peak}",
                (peak, top),
                xytext=(4, -14),
                textcoords="offset points",
                fontsize=8,
            )
        ax.set_title(
            f"{METHOD_LABELS[method]}: KL {row['kl_target_policy']:.3f}, "
            f"{row['modes_covered']}/{result['num_modes']} modes"
        )
        ax.set_xlabel("state x")
        ax.set_xlim(0, NUM_STATES - 1)
        ax.set_ylim(0, top)
        ax.legend(loc="upper left", frameon=False, fontsize=8)
    axes[0][0].set_ylabel("probability")
    fig.suptitle("Distribution matching (FlowRL) vs reward maximization; KL = KL(target||policy)")
    fig.tight_layout()
    return fig


def plot_toy(result: dict, path: str | Path) -> None:
    """Draw the target and each method's final policy (the paper's Figure 1) to a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = toy_figure(result)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
