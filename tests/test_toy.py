"""Tests of ``flowrl toy``, the paper's illustrative experiment (Figure 1).

The goal checked here is the paper's claim in our re-creation: FlowRL matches the multi-modal target
(KL(target||policy) <= 0.11, the paper's FlowRL figure, and every mode covered) while the reward
maximizers GRPO and REINFORCE++ collapse (fewer modes covered), on the default target and on others
given on the command line. One default run (through the CLI) is shared by the module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flowrl.commands.toy import main
from flowrl.toy import (
    DEFAULT_METHODS,
    METHOD_COLORS,
    METHOD_LABELS,
    METHODS,
    NUM_STATES,
    ToyConfig,
    kl_divergence,
    mode_windows,
    modes_covered,
    run_toy,
    target_log_probs,
    toy_figure,
)

PAPER_FLOWRL_KL = 0.11  # FlowRL's KL(target||policy) in the paper's Figure 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run of ``flowrl toy`` with default arguments, saved as JSON and PNG."""
    out = tmp_path_factory.mktemp("toy")
    json_path, plot_path = out / "toy.json", out / "toy.png"
    assert main(["--json", str(json_path), "--plot", str(plot_path)]) == 0
    return {"result": json.loads(json_path.read_text()), "json_path": json_path, "plot_path": plot_path}


def _assert_flowrl_matches_and_maximizers_collapse(result: dict, num_modes: int) -> None:
    methods = result["methods"]
    for name in ("flowrl", "flowrl_group"):
        if name in methods:
            assert methods[name]["kl_target_policy"] <= PAPER_FLOWRL_KL, name
            assert methods[name]["modes_covered"] == num_modes, name
    for name in ("grpo", "reinforce_pp"):
        if name not in methods:
            continue
        assert methods[name]["modes_covered"] < num_modes, name
        # A collapsed policy misses whole modes: its KL(target||policy) is far above FlowRL's.
        assert methods[name]["kl_target_policy"] > 10 * PAPER_FLOWRL_KL, name


# --- the goal ------------------------------------------------------------------------------------------


def test_default_json_has_the_documented_schema(default_run: dict) -> None:
    result = default_run["result"]
    assert list(result["methods"]) == list(DEFAULT_METHODS)  # the paper's figure: flowrl_group left out
    for row in result["methods"].values():
        assert set(row) == {"kl_target_policy", "kl_policy_target", "modes_covered"}
        assert row["kl_target_policy"] >= 0 and row["kl_policy_target"] >= 0
        assert 0 <= row["modes_covered"] <= 3
    assert len(result["target"]) == NUM_STATES
    assert math.isclose(sum(result["target"]), 1.0, rel_tol=1e-9)
    for policy in result["policies"].values():
        assert math.isclose(sum(policy), 1.0, rel_tol=1e-6)


def test_default_flowrl_matches_target_and_reward_maximizers_collapse(default_run: dict) -> None:
    _assert_flowrl_matches_and_maximizers_collapse(default_run["result"], num_modes=3)


def test_default_ppo_collapses_too(default_run: dict) -> None:
    assert default_run["result"]["methods"]["ppo"]["modes_covered"] < 3


def test_flowrl_recovers_the_two_to_one_mass_ratio(default_run: dict) -> None:
    # The default target puts mass 1:2:1 on the windows around 20, 50, 80 (bumps ~6 widths apart, so the
    # windows hold almost exactly 1/4, 1/2, 1/4 of the mass); a matched policy reproduces the ratio.
    policy = torch.tensor(default_run["result"]["policies"]["flowrl"])
    masses = [float(policy[lo : hi + 1].sum()) for lo, hi in mode_windows((20, 50, 80), 5.0)]
    assert masses[1] / masses[0] == pytest.approx(2.0, rel=0.15)
    assert masses[1] / masses[2] == pytest.approx(2.0, rel=0.15)


def test_flowrl_log_z_learns_the_partition_function(default_run: dict) -> None:
    # Z = sum_x exp(r(x)) * pi_ref(x) = sum_x p*(x) / 101 = 1/101 when beta = 1 and pi_ref is uniform.
    assert default_run["result"]["flowrl_log_z"] == pytest.approx(-math.log(NUM_STATES), abs=0.1)


def test_group_estimate_of_log_z_matches_the_target_without_a_learned_log_z() -> None:
    # FlowRL with log Z from each step's samples (log_z.mode=group) instead of a learned scalar
    result = run_toy(ToyConfig(methods=("flowrl_group",)))
    _assert_flowrl_matches_and_maximizers_collapse(result, num_modes=3)
    # the estimate of the last step is the partition function the learned one converges to: log(1/101)
    assert result["flowrl_group_log_z"] == pytest.approx(-math.log(NUM_STATES), abs=0.1)
    assert "flowrl_log_z" not in result


@pytest.mark.slow  # a whole experiment per target; the default target (default_run) stays in the fast tier
def test_goal_holds_for_another_three_mode_target() -> None:
    result = run_toy(ToyConfig(modes=(15, 45, 85), weights=(2.0, 1.0, 1.0)))
    _assert_flowrl_matches_and_maximizers_collapse(result, num_modes=3)


@pytest.mark.slow
def test_goal_holds_for_a_four_mode_target_from_the_command_line(tmp_path: Path) -> None:
    json_path = tmp_path / "four.json"
    argv = [
        "--modes",
        "10,35,60,90",
        "--weights",
        "1,2,1,3",
        "--width",
        "4",
        "--methods",
        "flowrl,flowrl_group,grpo,reinforce_pp",
    ]
    assert main([*argv, "--json", str(json_path)]) == 0
    result = json.loads(json_path.read_text())
    assert list(result["methods"]) == ["flowrl", "flowrl_group", "grpo", "reinforce_pp"]
    _assert_flowrl_matches_and_maximizers_collapse(result, num_modes=4)


# --- outputs -------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_json_and_another_seed_differs(tmp_path: Path) -> None:
    argv = ["--steps", "200", "--methods", "flowrl,ppo"]
    paths = [tmp_path / name for name in ("a.json", "b.json", "c.json")]
    assert main([*argv, "--seed", "3", "--json", str(paths[0])]) == 0
    assert main([*argv, "--seed", "3", "--json", str(paths[1])]) == 0
    assert main([*argv, "--seed", "4", "--json", str(paths[2])]) == 0
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()


def test_plot_is_a_valid_png(default_run: dict) -> None:
    import matplotlib.image

    data = default_run["plot_path"].read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    image = matplotlib.image.imread(default_run["plot_path"])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 4 * 100  # four panels side by side


def test_plot_draws_each_method_in_its_fixed_colour(default_run: dict) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    result = default_run["result"]
    fig = toy_figure(result)
    try:
        assert len(fig.axes) == len(result["methods"])
        for ax, method in zip(fig.axes, result["methods"], strict=True):
            (line,) = ax.get_lines()
            assert to_hex(line.get_color()) == to_hex(METHOD_COLORS[method]), method
            assert line.get_label() == METHOD_LABELS[method]
            (target,) = ax.collections
            assert to_hex(target.get_facecolor()[0], keep_alpha=False) == to_hex(METHOD_COLORS["target"])
            assert [t.get_text() for t in ax.get_legend().get_texts()] == ["target p*", METHOD_LABELS[method]]
    finally:
        plt.close(fig)
    assert len({METHOD_COLORS[m] for m in (*METHODS, "reference", "target")}) == len(METHODS) + 2


def test_table_lists_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--steps", "5", "--methods", "grpo,flowrl"]) == 0
    out = capsys.readouterr().out
    assert "KL(target||policy)" in out and "modes covered" in out
    table_rows = [line.split()[0] for line in out.splitlines() if line.endswith("/3")]
    assert table_rows == ["GRPO", "FlowRL"]


# --- the pieces, with hand-computed values -------------------------------------------------------------


def test_target_is_the_normalized_mixture_of_normalized_bumps() -> None:
    modes, weights, width = (20, 50, 80), (1.0, 2.0, 1.0), 5.0
    log_p = target_log_probs(modes, weights, width)
    assert log_p.shape == (NUM_STATES,)
    assert math.isclose(float(log_p.exp().sum()), 1.0, rel_tol=1e-12)
    # Straight from the definition: p(x) = sum_k w_k/sum(w) * g_k(x) / sum_y g_k(y), g_k a Gaussian.
    expected = [0.0] * NUM_STATES
    for centre, weight in zip(modes, weights, strict=True):
        bump = [math.exp(-0.5 * ((x - centre) / width) ** 2) for x in range(NUM_STATES)]
        for x in range(NUM_STATES):
            expected[x] += weight / sum(weights) * bump[x] / sum(bump)
    assert log_p.exp().tolist() == pytest.approx(expected, rel=1e-9)
    # Separated modes: the middle peak is twice as tall as the outer ones (up to ~1e-4: the outer bumps,
    # 4 widths from the edge, lose a Gaussian tail of ~3e-5 to the edge and are renormalized).
    probs = log_p.exp()
    assert float(probs[50] / probs[20]) == pytest.approx(2.0, rel=1e-4)
    assert float(probs[50] / probs[80]) == pytest.approx(2.0, rel=1e-4)


def test_kl_divergence_worked_example() -> None:
    # KL((1/2, 1/2) || (1/4, 3/4)) = 1/2 ln 2 + 1/2 ln(2/3) = 0.1438410...
    log_p = torch.tensor([0.5, 0.5], dtype=torch.float64).log()
    log_q = torch.tensor([0.25, 0.75], dtype=torch.float64).log()
    assert kl_divergence(log_p, log_q) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-12)
    assert kl_divergence(log_p, log_p) == 0.0


def test_mode_windows_are_two_widths_clipped_to_the_space() -> None:
    # 5 +- 2*3 = [-1, 11] -> [0, 11]; 50 +- 6 = [44, 56]; 98 +- 6 = [92, 104] -> [92, 100].
    assert mode_windows((5, 50, 98), 3.0) == [(0, 11), (44, 56), (92, 100)]


def test_modes_covered_counts_windows_with_a_quarter_of_the_target_mass() -> None:
    target = target_log_probs((20, 50, 80), (1.0, 2.0, 1.0), 5.0).exp()
    assert modes_covered(target, target, (20, 50, 80), 5.0) == 3
    point_mass = torch.zeros(NUM_STATES, dtype=torch.float64)
    point_mass[50] = 1.0
    assert modes_covered(point_mass, target, (20, 50, 80), 5.0) == 1
    # Uniform: the window [10, 30] holds 21/101 = 0.208 >= 0.25 * (about 1/4 of the target) = 0.0625.
    uniform = torch.full((NUM_STATES,), 1.0 / NUM_STATES, dtype=torch.float64)
    assert modes_covered(uniform, target, (20, 50, 80), 5.0) == 3
    # Mass 0.06 on the first window is under a quarter of its target mass (about 0.25): not covered.
    mostly_middle = torch.zeros(NUM_STATES, dtype=torch.float64)
    mostly_middle[20], mostly_middle[50], mostly_middle[80] = 0.06, 0.64, 0.30
    assert modes_covered(mostly_middle, target, (20, 50, 80), 5.0) == 2


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["--weights", "1,2"], "one weight per mode"),
        (["--weights", "1,0,1"], "positive"),
        (["--weights", "1,-2,1"], "positive"),
        (["--width", "0"], "positive number of states"),
        (["--width", "-3"], "positive number of states"),
        (["--modes", "20,50,120"], "0..100"),
        (["--modes=-5,50", "--weights=1,1"], "0..100"),
        (["--modes", "20,20", "--weights", "1,1"], "each mode once"),
        (["--modes", "a,b"], "comma-separated integers"),
        (["--methods", "flowrl,dpo"], "flowrl,flowrl_group,grpo,reinforce_pp,ppo"),
        (["--samples-per-step", "1"], "at least 2"),
        (["--steps", "0"], "at least 1"),
        (["--lr", "0"], "positive"),
    ],
)
def test_bad_input_exits_2_with_a_message_naming_the_fix(
    argv: list[str], hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert hint in capsys.readouterr().err


def test_config_rejects_bad_values_directly() -> None:
    with pytest.raises(ValueError, match="one weight per mode"):
        ToyConfig(modes=(20, 80), weights=(1.0, 2.0, 3.0))
