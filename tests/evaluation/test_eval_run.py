"""``flowrl eval`` on tiny random models: numbers, files, resume, rescore, several models, bad input."""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from flowrl.commands import eval as eval_command
from flowrl.data import synthetic
from flowrl.data.schema import read_rows, write_rows
from flowrl.evaluation import report
from flowrl.evaluation import run as eval_run
from flowrl.evaluation.metrics import default_ks, diversity_summary, pass_at_k, summarize_correctness
from flowrl.rewards.base import RewardStatus, safe_score
from flowrl.rewards.registry import register_reward

TINY = dict(hidden_size=32, num_layers=1, num_heads=2)
N = 4
SOURCE_A, SOURCE_B = "eval_fixture_a", "eval_fixture_b"


def fixture_reward(response: str, example: Mapping[str, Any]) -> float:
    """Deterministic in the response text: a third correct, some failing (to be counted, not hidden)."""
    h = zlib.crc32(response.encode())
    if h % 7 == 0:
        raise RuntimeError("fixture reward unavailable")
    return 1.0 if h % 3 == 0 else 0.0


register_reward(SOURCE_A, fixture_reward)
register_reward(SOURCE_B, fixture_reward)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and do not fight other processes for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return (
        synthetic.save_tiny_model(root / "alpha", seed=0, **TINY),
        synthetic.save_tiny_model(root / "beta", seed=1, **TINY),
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    rows = synthetic.rows()
    a = [dict(r, data_source=SOURCE_A) for r in rows[:6]]
    b = [dict(r, data_source=SOURCE_B) for r in rows[6:]]
    return write_rows(a, root / "a.jsonl"), write_rows(b, root / "b.jsonl")


def argv(models: list[str], data: tuple[Path, ...], out: Path, *extra: str) -> list[str]:
    args = [a for m in models for a in ("--model", m)]
    return [
        *args,
        "--data",
        *map(str, data),
        "--output-dir",
        str(out),
        "--n",
        str(N),
        "--max-new-tokens",
        "6",
        "--batch-size",
        str(2 * N),  # two problems per generate call
        *extra,
    ]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_numbers_match_the_metrics_and_files_are_written(
    models: tuple[Path, Path], data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval"
    assert eval_command.main(argv([str(models[0])], data, out)) == 0
    printed = capsys.readouterr()
    assert "avg@n" in printed.out and "self-BLEU" in printed.out

    results = json.loads((out / "results.json").read_text())
    model = results["models"]["alpha"]
    assert list(model["benchmarks"]) == [SOURCE_A, SOURCE_B]
    assert (out / "pass_at_k.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "report.md").read_text()
    assert "| alpha | eval_fixture_a |" in markdown and "pass@4" in markdown

    failed_total = 0
    for file, name in zip(data, (SOURCE_A, SOURCE_B), strict=True):
        rows = read_rows(file)
        gens = read_jsonl(out / "generations" / "alpha" / f"{name}.jsonl")
        assert [g["index"] for g in gens] == list(range(len(rows)))
        assert all(len(g["responses"]) == N for g in gens)
        # recompute everything from the saved generations, independently of the eval's scores file
        graded = [[safe_score(fixture_reward, t, rows[g["index"]]) for t in g["responses"]] for g in gens]
        correct = [[r.status is RewardStatus.CORRECT for r in rs] for rs in graded]
        answers = [[eval_run.final_answer(t) for t in g["responses"]] for g in gens]
        expected = summarize_correctness(correct, answers=answers)
        expected.update(
            {
                f"diversity/{k}": v
                for k, v in diversity_summary(
                    [g["responses"] for g in gens],
                    answers=answers,
                    correct=correct,
                    entropies=[g["token_entropy"] for g in gens],
                ).items()
            }
        )
        summary = model["benchmarks"][name]
        for key, value in expected.items():
            assert summary[key] == pytest.approx(value), key
        # by hand: avg@n is the mean fraction correct, pass@n the share of problems with a correct sample
        assert summary[f"avg@{N}"] == pytest.approx(sum(sum(c) / N for c in correct) / len(rows))
        assert summary[f"pass@{N}"] == pytest.approx(sum(any(c) for c in correct) / len(rows))
        assert summary["pass@2"] == pytest.approx(sum(pass_at_k(N, sum(c), 2) for c in correct) / len(rows))
        passes = [summary[f"pass@{k}"] for k in default_ks(N)]
        assert passes == sorted(passes)
        failed = sum(r.status is RewardStatus.ERROR for rs in graded for r in rs)
        assert summary["reward/status_error"] == summary["reward/failed"] == failed
        assert sum(summary[f"reward/status_{s.value}"] for s in RewardStatus) == len(rows) * N
        failed_total += failed
        # token entropy is a per-token entropy of a distribution over the vocabulary
        vocab = len(synthetic.build_tokenizer())
        assert all(0 < e <= math.log(vocab) + 1e-4 for g in gens for e in g["token_entropy"])

    # the headline: unweighted mean over benchmarks, stderr sqrt(sum se^2) / B
    a, b = model["benchmarks"][SOURCE_A], model["benchmarks"][SOURCE_B]
    key = f"avg@{N}"
    assert model["mean"][key] == pytest.approx((a[key] + b[key]) / 2)
    expected_se = math.sqrt(a[f"{key}_stderr"] ** 2 + b[f"{key}_stderr"] ** 2) / 2
    assert model["mean"][f"{key}_stderr"] == pytest.approx(expected_se)
    assert model["mean"]["reward/failed"] == failed_total
    assert failed_total > 0, "the fixture makes some rewards fail"
    # failed rewards are reported, not hidden
    assert "rewards failed" in printed.err and "fixture reward unavailable" in markdown


def test_resume_after_interruption_skips_done_problems(
    models: tuple[Path, Path], data: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = tmp_path / "straight"
    assert eval_command.main(argv([str(models[0])], data[:1], straight)) == 0

    sampled: list[int] = []
    original = eval_run.ModelSampler.sample

    def interrupted(self: eval_run.ModelSampler, rows: Any, *, seeds: Any) -> Any:
        if sampled:
            raise KeyboardInterrupt  # killed during the second generate call
        sampled.append(len(rows))
        return original(self, rows, seeds=seeds)

    out = tmp_path / "resumed"
    monkeypatch.setattr(eval_run.ModelSampler, "sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        eval_command.main(argv([str(models[0])], data[:1], out))
    gen_file = out / "generations" / "alpha" / f"{SOURCE_A}.jsonl"
    assert [g["index"] for g in read_jsonl(gen_file)] == [0, 1]
    with gen_file.open("a") as f:
        f.write('{"index": 2, "prompt_ha')  # and a line cut off mid-write

    counted: list[int] = []

    def counting(self: eval_run.ModelSampler, rows: Any, *, seeds: Any) -> Any:
        counted.append(len(rows))
        return original(self, rows, seeds=seeds)

    monkeypatch.setattr(eval_run.ModelSampler, "sample", counting)
    assert eval_command.main(argv([str(models[0])], data[:1], out)) == 0
    assert sum(counted) == 6 - 2, "only the problems not saved before the interruption are generated"
    # seeded per problem: the resumed run holds exactly what an uninterrupted run draws
    assert read_jsonl(gen_file) == read_jsonl(straight / "generations" / "alpha" / f"{SOURCE_A}.jsonl")
    a = json.loads((out / "results.json").read_text())["models"]["alpha"]["benchmarks"]
    b = json.loads((straight / "results.json").read_text())["models"]["alpha"]["benchmarks"]
    assert a == b

    counted.clear()  # a finished eval run again generates nothing and loads no model
    monkeypatch.setattr(eval_run.ModelSampler, "_load", lambda self: pytest.fail("model loaded"))
    assert eval_command.main(argv([str(models[0])], data[:1], out)) == 0 and counted == []


def test_samples_do_not_depend_on_the_batch_size(
    models: tuple[Path, Path], data: tuple[Path, Path], tmp_path: Path
) -> None:
    runs = {}
    for problems_per_call in (1, 4):
        out = tmp_path / f"per_call_{problems_per_call}"
        args = argv([str(models[0])], data[:1], out)
        args[args.index("--batch-size") + 1] = str(problems_per_call * N)
        assert eval_command.main(args) == 0
        runs[problems_per_call] = read_jsonl(out / "generations" / "alpha" / f"{SOURCE_A}.jsonl")
    assert runs[1] == runs[4]
    assert len({tuple(r["responses"]) for r in runs[1]}) > 1


def test_rescore_uses_saved_generations_only(
    models: tuple[Path, Path],
    data: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "eval"
    assert eval_command.main(argv([str(models[0])], data, out)) == 0
    gen_file = out / "generations" / "alpha" / f"{SOURCE_A}.jsonl"
    saved = gen_file.read_bytes()
    capsys.readouterr()

    monkeypatch.setattr(eval_run.ModelSampler, "_load", lambda self: pytest.fail("rescore loaded a model"))
    other_reward = ("--reward", "tests.helpers.flaky_rewards:always_nan")
    # scores made with another reward are not mixed in silently
    assert eval_command.main(argv([str(models[0])], data, out, *other_reward)) == 2
    assert "--rescore" in capsys.readouterr().err

    # no --model: every model with saved generations; every reward now fails, and that is what is reported
    rescore = ["--data", *map(str, data), "--output-dir", str(out), "--rescore", *other_reward]
    assert eval_command.main(rescore) == 0
    assert gen_file.read_bytes() == saved
    summary = json.loads((out / "results.json").read_text())["models"]["alpha"]["benchmarks"][SOURCE_A]
    assert summary["reward/status_error"] == summary["reward/failed"] == 6 * N
    assert summary[f"avg@{N}"] == 0.0
    assert "24 of 24 rewards failed" in capsys.readouterr().err

    # generations missing for some problems: rescore says to generate first
    gen_file.write_bytes(b"".join(saved.splitlines(keepends=True)[:3]))
    assert eval_command.main(rescore) == 2
    assert "3 of 6 problems" in capsys.readouterr().err


def test_several_models_give_several_curves(
    models: tuple[Path, Path], data: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    assert eval_command.main(argv([str(models[0]), f"second={models[1]}"], data, out)) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == ["alpha", "second"]
    drawn = report.plot_pass_at_k(results, tmp_path / "again.png")
    assert drawn == {
        SOURCE_A: ["alpha", "second"],
        SOURCE_B: ["alpha", "second"],
        "mean": ["alpha", "second"],
    }
    a = read_jsonl(out / "generations" / "alpha" / f"{SOURCE_A}.jsonl")
    b = read_jsonl(out / "generations" / "second" / f"{SOURCE_A}.jsonl")
    assert [g["responses"] for g in a] != [g["responses"] for g in b]
    table = report.format_table(results)
    assert table.count("second") == 3 * 2  # two benchmarks and the mean, in both tables


def test_changed_settings_or_data_are_refused(
    models: tuple[Path, Path],
    data: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "eval"
    assert eval_command.main(argv([str(models[0])], data[:1], out, "--limit", "2")) == 0
    assert eval_command.main(argv([str(models[0])], data[:1], out, "--temperature", "1.0")) == 2
    assert "temperature: 0.6 then, 1.0 now" in capsys.readouterr().err
    rows = read_rows(data[0])
    rows[1]["prompt"][0]["content"] = "sum 99:"
    changed = write_rows(rows, tmp_path / "a.jsonl")
    assert eval_command.main(argv([str(models[0])], (changed,), out)) == 2
    assert "data file changed" in capsys.readouterr().err


def test_bad_input_fails_before_generating(
    models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unknown = write_rows(synthetic.rows()[:2], tmp_path / "digits.jsonl")  # no reward registered for it
    assert eval_command.main(argv([str(models[0])], (unknown,), tmp_path / "eval")) == 2
    assert "register_reward" in capsys.readouterr().err
    assert not (tmp_path / "eval" / "generations").exists()
    synthetic_reward = ("--reward", "flowrl.data.synthetic:reward")
    assert (
        eval_command.main(argv([str(tmp_path / "missing")], (unknown,), tmp_path / "eval", *synthetic_reward))
        == 2
    )
    assert "no such directory" in capsys.readouterr().err
    greedy = argv([str(models[0])], (unknown,), tmp_path / "eval", "--temperature", "0")
    assert eval_command.main(greedy) == 2 and "--n 1" in capsys.readouterr().err


def test_model_paths_resolve(models: tuple[Path, Path], tmp_path: Path) -> None:
    from flowrl.checkpoint import save_checkpoint
    from flowrl.policy import load_model, load_tokenizer

    run = tmp_path / "myrun"
    tokenizer, model = load_tokenizer(str(models[0])), load_model(str(models[0]))
    for step in (3, 7):
        save_checkpoint(
            run / "checkpoints", step, model=model, tokenizer=tokenizer, head=None, trainer_state={}
        )
    latest = run / "checkpoints" / "step_000007"
    spec = eval_run.resolve_model(str(run))
    assert (spec.label, Path(spec.path)) == ("myrun-step_000007", (latest / "model").resolve())
    assert eval_run.resolve_model(str(run / "checkpoints" / "step_000003")).label == "myrun-step_000003"
    assert eval_run.resolve_model(str(latest / "model")).label == "myrun-step_000007"
    assert eval_run.resolve_model(f"flow={run}").label == "flow"
    hub = eval_run.resolve_model("Qwen/Qwen2.5-7B")
    assert (hub.label, hub.path) == ("Qwen__Qwen2.5-7B", "Qwen/Qwen2.5-7B")
    with pytest.raises(ValueError, match="not a model directory"):
        eval_run.resolve_model(str(tmp_path))
