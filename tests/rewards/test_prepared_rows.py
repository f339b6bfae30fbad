"""Rows written by `flowrl data prepare` are scored by the reward registry: the two ends agree on formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowrl.data.prepare import prepare_dataset
from flowrl.data.schema import read_rows
from flowrl.rewards import code as fc
from flowrl.rewards.registry import score_batch
from tests.rewards.test_code_sandbox import needs_bwrap

FIXTURES = Path(__file__).parents[1] / "data" / "fixtures"
CODE_FIXTURES = {
    "deepcoder": "deepcoder_primeintellect.parquet",
    "taco": "taco_train.jsonl",
    "apps": "apps_test.json",
    "livecodebench": "livecodebench_test.jsonl",
    "humanevalplus": "humanevalplus.jsonl",
}


def prepared(tmp_path: Path, name: str) -> list[dict]:
    _, out, _ = prepare_dataset(name, FIXTURES / CODE_FIXTURES[name], output=tmp_path / f"{name}.parquet")
    return read_rows(out)


@pytest.mark.parametrize("name", sorted(CODE_FIXTURES))
def test_every_prepared_code_row_parses(tmp_path: Path, name: str) -> None:
    rows = prepared(tmp_path, name)
    assert rows
    for row in rows:
        assert fc.parse_tests(row["reward_model"]["ground_truth"]), row["extra_info"]


@needs_bwrap
def test_humaneval_canonical_solutions_pass_and_a_wrong_one_fails(tmp_path: Path) -> None:
    records = [json.loads(line) for line in (FIXTURES / "humanevalplus.jsonl").read_text().splitlines()]
    canonical = {r["entry_point"]: r["prompt"] + r["canonical_solution"] for r in records}
    rows = prepared(tmp_path, "humanevalplus")
    solutions = [canonical[json.loads(r["reward_model"]["ground_truth"])["entry_point"]] for r in rows]
    responses = [f"```python\n{s}```" for s in solutions]
    results = score_batch(responses, rows, reward_fn=None, num_workers=2)
    assert [r.score for r in results] == [1.0] * len(rows), [r.status for r in results]
    broken = [f"```python\n{s.replace('return', 'return 1 + ')}```" for s in solutions]
    assert all(r.score < 1.0 for r in score_batch(broken, rows, reward_fn=None, num_workers=2))
