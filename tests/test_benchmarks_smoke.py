"""The benchmark scripts run end to end at their smallest size (subprocesses: the slow tier, which CI runs).

The engine options they rely on (``SamplingParams.ignore_eos``, the inverse-CDF sampler, no generation
settings leaking in from a model's saved generation config) are tested in ``test_rollout_sampling.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # every test here runs a benchmark script in a subprocess


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


def test_vs_trl_smoke(tmp_path: Path) -> None:
    report = run_script("vs_trl", "--preset", "smoke", "--repeats", "1", tmp_path=tmp_path)
    for name, summary in report["summary"].items():
        assert summary["completion_length"] == 4, name  # both sides forced to full length
        assert summary["seconds_per_step"] > 0
    assert "flowrl_vs_trl_grpo_throughput" in report["comparisons"]


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
        # the process is all of it at this size, and what it holds moves by 0.08 GB with the page cache
        # (the plan takes the middle): within 0.1 GB
        assert abs(entry["measured_gb"] - entry["planned_gb"]) < 0.1, (row, entry["relative_error"])
        assert entry["bytes_per_parameter"] > 0 and entry["plan"]["peak_phase"]


def test_memory_smoke(tmp_path: Path) -> None:
    report = run_script(
        "memory", "--preset", "smoke", "--rows", "flowrl,flowrl_lora", "--no-baseline", tmp_path=tmp_path
    )
    _memory_rows_check(report, ["flowrl", "flowrl_lora"])
    flowrl = report["rows"]["flowrl"]
    assert [m["phase"] for m in flowrl["processes"][0]["phases"]][:2] == ["load", "rollout"]
    assert report["rows"]["flowrl_lora"]["plan"]["setup"]["lora"]


def test_memory_smoke_every_row(tmp_path: Path) -> None:
    report = run_script("memory", "--preset", "smoke", tmp_path=tmp_path)
    rows = [
        "flowrl",
        "flowrl_in_backward",
        "grpo",
        "flowrl_lora",
        "flowrl_fsdp2",
        "trl_grpo",
        "trl_grpo_peft",
    ]
    _memory_rows_check(report, rows)
    assert len(report["rows"]["flowrl_fsdp2"]["processes"]) == 2  # one report per rank
    assert set(report["baselines_gb"]) == {"baseline", "trl_baseline"}


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
