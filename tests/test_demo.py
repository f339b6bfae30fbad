"""`flowrl demo` end to end at a tiny budget, and its exact metrics checked against enumeration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flowrl import cli, demo
from flowrl.data import synthetic
from flowrl.policy import load_model, load_tokenizer


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--compare", "--steps", "4", "--eval-every", "2", "--sft-steps", "30"]
    argv += ["--output-dir", str(out / "demo"), "--json", str(out / "demo.json")]
    capture = pytest.MonkeyPatch()
    import io
    import sys

    buffer = io.StringIO()
    capture.setattr(sys, "stdout", buffer)
    try:
        assert cli.main(argv) == 0
    finally:
        capture.undo()
    return out, json.loads((out / "demo.json").read_text()), buffer.getvalue()


def test_compare_prints_both_methods_and_a_matched_grpo_checkpoint(compare_run) -> None:
    out, report, stdout = compare_run
    results = report["results"]
    matched = [name for name in results if name.startswith("grpo@")]
    assert list(results)[:3] == ["sft (start)", "flowrl", "grpo"] and len(matched) == 1
    for name in ["flowrl", "grpo"]:
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
