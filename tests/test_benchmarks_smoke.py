"""The benchmark scripts run end to end at their smallest size, and the engine options they rely on
(``SamplingParams.ignore_eos``, the inverse-CDF sampler, no generation settings leaking in from a model's
saved generation config) do what they claim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from flowrl.data import synthetic
from flowrl.rollout import HFRolloutEngine, SamplingParams
from flowrl.rollout.hf import inverse_cdf_sample

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, num_layers=1, num_heads=2)


@pytest.fixture(scope="module")
def engine() -> tuple[HFRolloutEngine, object, list[int]]:
    tokenizer = synthetic.build_tokenizer()
    model = synthetic.build_tiny_model(tokenizer, seed=0, **TINY)
    engine = HFRolloutEngine(
        model,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        batch_size=4096,
        show_progress=False,
    )
    return engine, tokenizer, tokenizer("sum 7:")["input_ids"]


def test_ignore_eos_runs_every_response_to_max_new_tokens(engine) -> None:
    eng, tokenizer, prompt = engine
    torch.manual_seed(0)
    stopping = eng.generate([prompt], SamplingParams(n=64, max_new_tokens=40))
    assert stopping.response_lengths.min() < 40  # this model samples EOS (about 4% per token)
    torch.manual_seed(0)
    fixed = eng.generate([prompt], SamplingParams(n=64, max_new_tokens=40, ignore_eos=True))
    assert fixed.response_ids.shape == (64, 40)
    assert bool((fixed.response_mask == 1).all()) and bool(fixed.truncated.all())
    assert int((fixed.response_ids == tokenizer.eos_token_id).sum()) > 0  # EOS is sampled, not banned


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    expected = probs * counts.sum()
    support = expected > 0
    chi2 = float((((counts - expected) ** 2)[support] / expected[support]).sum())
    return chi2, int(support.sum()) - 1


def test_inverse_cdf_sampler_draws_from_the_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(50) * 2
    logits[[3, 17]] = float("-inf")  # tokens a top-k / top-p warper removed
    draws = 40_000
    tokens = inverse_cdf_sample(logits.expand(draws, -1).clone())
    counts = torch.bincount(tokens, minlength=50).float()
    assert counts[[3, 17]].sum() == 0
    chi2, dof = _chi_square(counts, torch.softmax(logits, -1))
    assert chi2 < dof + 6 * (2 * dof) ** 0.5  # about 6 sigma: fails on a wrong distribution, not on noise


def test_engine_samples_at_temperature_and_top_k(engine) -> None:
    eng, _, prompt = engine
    torch.manual_seed(0)
    batch = eng.generate([prompt], SamplingParams(n=20_000, temperature=0.7, top_k=5, max_new_tokens=1))
    counts = torch.bincount(batch.response_ids[:, 0], minlength=eng.model.config.vocab_size).float()
    with torch.no_grad():
        logits = eng.model(torch.tensor([prompt])).logits[0, -1] / 0.7
    kept = logits >= logits.topk(5).values[-1]
    probs = torch.softmax(logits.masked_fill(~kept, float("-inf")), -1)
    assert counts[~kept].sum() == 0
    chi2, dof = _chi_square(counts, probs)
    assert chi2 < dof + 6 * (2 * dof) ** 0.5


def test_a_saved_generation_config_does_not_change_sampling(engine) -> None:
    eng, _, prompt = engine
    saved = GenerationConfig(do_sample=True, top_k=1, repetition_penalty=50.0, temperature=0.1)
    eng.model.generation_config = saved
    try:
        torch.manual_seed(0)
        batch = eng.generate([prompt], SamplingParams(n=256, max_new_tokens=1))
    finally:
        eng.model.generation_config = GenerationConfig()
    assert len(set(batch.response_ids[:, 0].tolist())) > 3  # top_k=1 or temperature 0.1 would give ~1
    assert eng.model.generation_config is not saved  # restored to what it was before the call


def run_script(script: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{script}.py"), *args, "--json", str(out)],
        check=True,
        cwd=REPO,
        capture_output=True,
        timeout=600,
    )
    report = json.loads(out.read_text())
    env = report["environment"]
    assert env["cpu_count"] >= 1 and len(env["load_average_start"]) == 3 and env["versions"]["torch"]
    assert env["command"].startswith(".venv/bin/python benchmarks/")
    return report


def test_flowrl_vs_grpo_smoke(tmp_path: Path) -> None:
    report = run_script(
        "flowrl_vs_grpo", "--preset", "smoke", "--repeats", "1", "--methods", "flowrl,grpo,grpo_kl",
        tmp_path=tmp_path,
    )  # fmt: skip
    flowrl, grpo = report["summary"]["flowrl"], report["summary"]["grpo"]
    assert flowrl["reference_model"] and not grpo["reference_model"]
    assert report["summary"]["grpo_kl"]["reference_model"]  # a KL to pi_ref: the same reference pass
    assert flowrl["response_length"] == grpo["response_length"] == 4  # forced to full length
    assert flowrl["median_s"]["step_wall_s"] > 0 and flowrl["peak_memory"]["peak_rss_mib"] > 0
    assert {"flowrl_vs_grpo", "flowrl_vs_grpo_kl", "reference_pass_s"} <= set(report["comparisons"])


@pytest.mark.slow
def test_vs_trl_smoke(tmp_path: Path) -> None:
    report = run_script("vs_trl", "--preset", "smoke", "--repeats", "1", tmp_path=tmp_path)
    for name, summary in report["summary"].items():
        assert summary["completion_length"] == 4, name  # both sides forced to full length
        assert summary["seconds_per_step"] > 0
    assert "flowrl_vs_trl_grpo_throughput" in report["comparisons"]


@pytest.mark.slow
def test_gpu_efficiency_cpu_smoke(tmp_path: Path) -> None:
    report = run_script("gpu_efficiency", "--device", "cpu", "--preset", "smoke", tmp_path=tmp_path)
    tiny = report["models"]["tiny"]
    assert report["limits"]["peak_flops"] > 0 and report["limits"]["bandwidth_bytes_per_s"] > 0
    assert 0 < tiny["update"]["mfu"] and 0 < tiny["decode"]["fraction_of_bound"]


def _memory_rows_check(report: dict, rows: list[str]) -> None:
    assert report["benchmark"] == "memory" and report["device"] == "cpu"
    for row in rows:
        entry = report["rows"][row]
        assert "error" not in entry, entry.get("error")
        assert entry["measured_gb"] > 0.1 and entry["planned_gb"] > 0.1  # a process holds ~0.4 GB
        assert abs(entry["relative_error"]) < 0.5, row  # at this size the process baseline is most of it
        assert entry["bytes_per_parameter"] > 0 and entry["plan"]["peak_phase"]


def test_memory_smoke(tmp_path: Path) -> None:
    report = run_script(
        "memory", "--preset", "smoke", "--rows", "flowrl,flowrl_lora", "--no-baseline", tmp_path=tmp_path
    )
    _memory_rows_check(report, ["flowrl", "flowrl_lora"])
    flowrl = report["rows"]["flowrl"]
    assert [m["phase"] for m in flowrl["processes"][0]["phases"]][:2] == ["load", "rollout"]
    assert report["rows"]["flowrl_lora"]["plan"]["setup"]["lora"]


@pytest.mark.slow
def test_memory_smoke_every_row(tmp_path: Path) -> None:
    report = run_script("memory", "--preset", "smoke", tmp_path=tmp_path)
    rows = ["flowrl", "grpo", "flowrl_lora", "flowrl_fsdp2", "trl_grpo", "trl_grpo_peft"]
    _memory_rows_check(report, rows)
    assert len(report["rows"]["flowrl_fsdp2"]["processes"]) == 2  # one report per rank
    assert set(report["baselines_gb"]) == {"baseline", "trl_baseline"}


@pytest.mark.slow
def test_log_z_ablation_smoke(tmp_path: Path) -> None:
    plot = tmp_path / "log_z_ablation.png"
    report = run_script("log_z_ablation", "--preset", "smoke", "--plot", str(plot), tmp_path=tmp_path)
    methods = ["flowrl", "flowrl_group", "grpo"]
    toy = report["toy"]["mean_over_seeds"]["default"]
    for method in methods:
        row = toy[method]["10"]
        assert row["kl_target_policy"] > 0 and 0 <= row["modes_covered"] <= 1 and row["ms_per_step"] > 0
        assert 0 < row["in_mode_mass"] < 1
    assert toy["flowrl"]["10"] != toy["flowrl_group"]["10"]  # two different runs, not one copied
    demo = report["demo"]["mean_over_seeds"]
    for method in methods:
        assert demo[method]["kl_to_target"] > 0 and 0 <= demo[method]["accuracy"] <= 1
        assert demo[method]["perf/step_time_s"] > 0
    timing = report["timing"]
    assert set(timing["median_s"]) == {"flowrl", "flowrl_group", "grpo", "flowrl/4", "flowrl_group/4"}
    assert all(m["perf/step_time_s"] > 0 for m in timing["median_s"].values())
    assert timing["runs"]["flowrl_group"][0]["log_z_head_parameters"] == 0  # no head in group mode
    assert timing["runs"]["flowrl"][0]["log_z_head_parameters"] > 0
    assert plot.read_bytes()[:4] == b"\x89PNG"
