"""`flowrl demo` end to end at a tiny budget, and its exact metrics checked against enumeration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flowrl import commands, demo
from flowrl.data import synthetic
from flowrl.policy import load_model, load_tokenizer
from flowrl.sft import sft


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--compare", "--log-z", "both", "--steps", "4", "--eval-every", "2", "--sft-steps", "30"]
    argv += ["--output-dir", str(out / "demo"), "--json", str(out / "demo.json")]
    capture = pytest.MonkeyPatch()
    import io
    import sys

    buffer = io.StringIO()
    capture.setattr(sys, "stdout", buffer)
    try:
        assert commands.main(argv) == 0
    finally:
        capture.undo()
    return out, json.loads((out / "demo.json").read_text()), buffer.getvalue()


def test_compare_prints_both_methods_and_a_matched_grpo_checkpoint(compare_run) -> None:
    out, report, stdout = compare_run
    results = report["results"]
    matched = [name for name in results if name.startswith("grpo@")]
    assert list(results)[:4] == ["sft (start)", "flowrl", "flowrl_group", "grpo"] and len(matched) == 1
    for name in ["flowrl", "flowrl_group", "grpo"]:
        assert [p["step"] for p in report["trajectories"][name]] == [0, 2, 4]
        assert results[name]["step"] == 4
    # the matched column is the GRPO checkpoint closest to FlowRL's final accuracy
    grpo = report["trajectories"]["grpo"]
    best = min(abs(p["accuracy"] - results["flowrl"]["accuracy"]) for p in grpo)
    assert abs(results[matched[0]]["accuracy"] - results["flowrl"]["accuracy"]) == best
    for metrics in results.values():
        assert all(math.isfinite(v) for v in metrics.values())
        assert 0 <= metrics["accuracy"] <= metrics["pass@4"] <= metrics["pass@16"] <= 1
        assert 0 <= metrics["modes_covered"] <= 1 and metrics["kl_to_target"] >= 0
    for label in ["correct answers covered", "KL(target || policy)", "RL step"]:
        assert label in stdout
    assert (out / "demo" / "demo.png").stat().st_size > 0
    assert (out / "demo" / "flowrl" / "metrics.jsonl").exists()


def test_log_z_group_run_has_no_head(compare_run) -> None:
    from safetensors.torch import load_file

    from flowrl.checkpoint import HEAD_FILE, latest_checkpoint
    from flowrl.config import load_config

    out, _, stdout = compare_run
    for name, mode in (("flowrl", "head"), ("flowrl_group", "group")):
        run = out / "demo" / name
        assert load_config(run / "config.yaml").log_z.mode == mode
        head = latest_checkpoint(run / "checkpoints") / HEAD_FILE
        has_head = head.exists() and bool(load_file(str(head)))
        assert has_head == (mode == "head"), name
    header = next(line for line in stdout.splitlines() if line.startswith("metric"))
    assert header.split()[1:5] == ["sft", "(start)", "flowrl", "flowrl_group"]  # columns stay apart


def test_exact_metrics_match_enumeration(compare_run) -> None:
    out, report, _ = compare_run
    sft_dir = out / "demo" / "sft_model"
    tokenizer, model = load_tokenizer(str(sft_dir)), load_model(str(sft_dir))
    dist = demo.answer_distribution(model, tokenizer, 9)
    assert set(dist) == set(synthetic.candidate_answers())
    assert 0.0 < sum(dist.values()) <= 1.0 + 1e-5  # well-formed answers are part of all responses
    # one answer's probability recomputed token by token with the model's own logits
    ids = tokenizer(synthetic.prompt_for(9) + synthetic.response_for("45"), add_special_tokens=False)
    ids = torch.tensor([ids["input_ids"] + [tokenizer.eos_token_id]])  # the answer ends the response
    prompt_len = len(tokenizer(synthetic.prompt_for(9), add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = model(ids).logits.log_softmax(-1)[0, prompt_len - 1 : -1].gather(-1, ids[0, prompt_len:, None])
    assert dist["45"] == pytest.approx(logp.sum().exp().item(), rel=1e-4)
    # at the start the policy is the reference: its KL to the target is -log(mass on correct answers)
    ref = {s: demo.answer_distribution(model, tokenizer, s) for s in synthetic.SUMS}
    start = demo.evaluate(model, tokenizer, ref, seed=0)
    expected = [-math.log(sum(ref[s][a] for a in synthetic.correct_answers(s))) for s in synthetic.SUMS]
    assert start["kl_to_target"] == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    # a correct answer is covered when it keeps a quarter of its target share: pi_ref(a) >= pi_ref(a) / 4 mass
    masses = [sum(ref[s][a] for a in synthetic.correct_answers(s)) for s in synthetic.SUMS]
    assert start["modes_covered"] == pytest.approx(sum(m >= 0.25 for m in masses) / len(masses))
    assert report["results"]["sft (start)"]["kl_to_target"] == pytest.approx(start["kl_to_target"], rel=1e-4)


def test_correct_answers_off_the_format_are_counted_not_hidden(compare_run) -> None:
    """A policy taught to close its box twice: the reward takes its answers, the exact rows cannot see them
    (they cover `` \\boxed{dd}<eos>`` only), and the table's off-format row counts them."""
    out, report, stdout = compare_run
    assert demo.EXACT_SET_NOTE in stdout and "correct, not well-formed (sampled share)" in stdout
    for metrics in report["results"].values():
        assert 0 <= metrics["off_format"] <= metrics["accuracy"]
    sft_dir = out / "demo" / "sft_model"
    tokenizer, model = load_tokenizer(str(sft_dir)), load_model(str(sft_dir))
    ref = {s: demo.answer_distribution(model, tokenizer, s) for s in synthetic.SUMS}
    pairs = [
        (synthetic.prompt_for(s), synthetic.response_for(a) + "}")
        for s in synthetic.SUMS
        for a in synthetic.correct_answers(s)
    ]
    sft(model, tokenizer, pairs, steps=60, seed=0, progress=False)
    got = demo.evaluate(model, tokenizer, ref, seed=0)
    # the taught form: the reward accepts it, the exact rows do not see it (their mass on correct answers
    # is that of the well-formed ones, about 0.1 of the 320 samples here), the new row counts it
    assert got["mass_correct"] < 0.01
    assert 0 < got["off_format"] <= got["accuracy"] <= got["off_format"] + 0.02
    # well-formed: the answer, its closing brace, EOS, token for token
    well_formed = demo.well_formed_ids(tokenizer)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert len(well_formed) == len(synthetic.candidate_answers())
    assert (*encode(synthetic.response_for("34")), tokenizer.eos_token_id) in well_formed
    assert tuple(encode(synthetic.response_for("34"))) not in well_formed  # cut before EOS
    assert (*encode(synthetic.response_for("34") + "}"), tokenizer.eos_token_id) not in well_formed


# --- the plot ---------------------------------------------------------------------------------------------


def _plot_inputs(total: int = 9) -> tuple[dict, dict]:
    """Small made-up inputs of :func:`demo.figure`: three answer distributions, two runs of three points."""
    answers = synthetic.candidate_answers()
    weights = torch.rand(len(answers), generator=torch.Generator().manual_seed(0)) + 0.1
    ref = dict(zip(answers, (0.5 * weights / weights.sum()).tolist(), strict=True))
    good = synthetic.correct_answers(total)
    flowrl = {a: (0.9 / len(good) if a in good else 0.1 / (len(answers) - len(good))) for a in answers}
    grpo = {a: 0.0 for a in answers} | {good[3]: 0.98, good[0]: 0.01}  # collapsed: a bar the axis cuts
    dists = {demo.REFERENCE: ref, "flowrl": flowrl, "grpo": grpo}
    start = {"step": 0, "accuracy": 0.5, "modes_covered": 1.0}
    trajectories = {
        "flowrl": [
            start,
            {"step": 300, "accuracy": 0.9, "modes_covered": 0.9},
            {"step": 600, "accuracy": 0.95, "modes_covered": 0.88},
        ],
        "grpo": [
            start,
            {"step": 300, "accuracy": 0.97, "modes_covered": 0.2},
            {"step": 600, "accuracy": 0.96, "modes_covered": 0.15},
        ],
    }
    return trajectories, dists


def _colors_by_gid(ax) -> dict[str, set[str]]:
    """The colours of every artist of ``ax`` that names its policy (or the target) in its gid."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_hex
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    found: dict[str, set[str]] = {}
    for artist in ax.get_children():
        if artist.get_gid() is None:
            continue
        if isinstance(artist, Rectangle):
            colors = {to_hex(artist.get_facecolor())}
        elif isinstance(artist, Line2D):
            colors = {to_hex(artist.get_color()), to_hex(artist.get_markerfacecolor())}
        elif isinstance(artist, LineCollection):
            colors = {to_hex(c) for c in artist.get_colors()}
        else:
            raise AssertionError(f"unexpected artist {artist!r}")
        found.setdefault(artist.get_gid(), set()).update(colors)
    return found


@pytest.mark.parametrize("reverse", [False, True], ids=["flowrl-first", "grpo-first"])
def test_plot_gives_each_method_one_colour_in_both_panels(reverse: bool) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    from flowrl.toy import METHOD_COLORS

    trajectories, dists = _plot_inputs()
    if reverse:  # the colour of a method must not depend on the order it is drawn in
        trajectories = dict(reversed(trajectories.items()))
        dists = {demo.REFERENCE: dists[demo.REFERENCE], "grpo": dists["grpo"], "flowrl": dists["flowrl"]}
    fig, colors = demo.figure(trajectories, dists, 9)
    try:
        expected = {
            "flowrl": METHOD_COLORS["flowrl"],
            "grpo": METHOD_COLORS["grpo"],
            demo.REFERENCE: METHOD_COLORS["reference"],
            "target": METHOD_COLORS["target"],
        }
        assert colors == expected
        assert len(set(expected.values())) == len(expected)  # every curve its own colour
        left, right = fig.axes
        for ax in (left, right):
            found = _colors_by_gid(ax)
            # every policy and the target are drawn in both panels, each in exactly its map colour
            assert set(found) == set(expected), ax.get_title()
            for name, seen in found.items():
                assert seen == {to_hex(expected[name])}, (ax.get_title(), name, seen)
    finally:
        plt.close(fig)


def test_plot_draws_the_target_and_labels_that_do_not_collide() -> None:
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    trajectories, dists = _plot_inputs()
    # runs that end at nearly the same point, where labels next to their final points would collide
    trajectories["grpo"][-1] = {"step": 600, "accuracy": 0.955, "modes_covered": 0.87}
    fig, _ = demo.figure(trajectories, dists, 9)
    try:
        left, right = fig.axes
        # the target: the reference renormalized over the correct answers, one segment per answer
        (target,) = [
            a for a in left.get_children() if isinstance(a, LineCollection) and a.get_gid() == "target"
        ]
        ref, good = dists[demo.REFERENCE], synthetic.correct_answers(9)
        expected = sorted((ref[a] / sum(ref[b] for b in good) for a in good), reverse=True)
        assert [seg[0][1] for seg in target.get_segments()] == pytest.approx(expected)
        assert sum(expected) == pytest.approx(1.0)
        assert "target" in target.get_label()
        assert any("target" in t.get_text() for t in left.get_legend().get_texts())
        assert any("target" in t.get_text() for t in right.get_legend().get_texts())
        # the collapsed policy's bar is cut by the axis and labelled with its height
        assert any(t.get_text().startswith("0.98") for t in left.texts)
        # no two labels overlap (the old 'step 600' labels did), nor a legend a panel or another label
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        labels = [t for ax in (left, right) for t in ax.texts]
        labels += [ax.get_legend() for ax in (left, right)] + list(fig.texts)
        labels += [a for ax in (left, right) for a in (ax.title, ax.xaxis.label, ax.yaxis.label)]
        boxes = [a.get_window_extent(renderer) for a in labels]
        for i, a in enumerate(boxes):
            for j in range(i + 1, len(boxes)):
                assert not a.overlaps(boxes[j]), (labels[i], labels[j])
        for ax in (left, right):
            assert not ax.get_legend().get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    finally:
        plt.close(fig)


def test_demo_png_uses_the_fixed_colours(compare_run) -> None:
    import matplotlib.image
    import numpy as np
    from matplotlib.colors import to_rgb

    from flowrl.toy import METHOD_COLORS

    out, _, _ = compare_run
    pixels = matplotlib.image.imread(out / "demo" / "demo.png")[..., :3]

    def present(color: str) -> bool:
        return bool((np.abs(pixels - np.array(to_rgb(color))).max(-1) < 0.02).any())

    for method in ("flowrl", "flowrl_group", "grpo", "reference"):
        assert present(METHOD_COLORS[method]), method
    for default in ("#1f77b4", "#ff7f0e", "#2ca02c"):  # matplotlib's colour cycle, which the old plot used
        assert not present(default), default
