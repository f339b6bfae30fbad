"""The project's data format: verl's parquet schema, so files move between flowrl, verl and TRL.

One row per problem::

    {
      "prompt": [{"role": "user", "content": "..."}],       # chat messages
      "data_source": "math_dapo",                            # picks the reward function
      "ability": "math",
      "reward_model": {"style": "rule", "ground_truth": "42"},
      "extra_info": {"index": 0, ...},
    }

Files are Parquet (``.parquet``) or JSON Lines (``.jsonl``); both read into a list of such dicts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REQUIRED_COLUMNS = ("prompt", "data_source", "reward_model")


def validate_row(row: Mapping[str, Any], where: str = "row") -> None:
    """Raise ``ValueError`` naming the problem when ``row`` is not in the schema."""
    missing = [c for c in REQUIRED_COLUMNS if c not in row]
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {missing}; expected verl's schema with columns "
            f"{list(REQUIRED_COLUMNS)} (+ 'ability', 'extra_info'). "
            "Convert raw datasets with `flowrl data prepare`."
        )
    prompt = row["prompt"]
    if isinstance(prompt, str) or not all(isinstance(m, Mapping) and "content" in m for m in prompt):
        raise ValueError(
            f"{where}: 'prompt' must be a list of chat messages [{{'role': ..., 'content': ...}}]"
        )
    if not isinstance(row["reward_model"], Mapping) or "ground_truth" not in row["reward_model"]:
        raise ValueError(f"{where}: 'reward_model' must be a dict with a 'ground_truth' key")


def _plain(value: Any) -> Any:
    """Arrow gives numpy arrays for list columns; turn them back into Python lists."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``.parquet`` or ``.jsonl`` file in the schema and validate every row."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = [_plain(r) for r in pq.read_table(path).to_pylist()]
    elif path.suffix in (".jsonl", ".json"):
        with path.open() as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .parquet or .jsonl")
    for i, row in enumerate(rows):
        validate_row(row, where=f"{path} row {i}")
    return rows


def write_rows(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows to ``.parquet`` or ``.jsonl`` (by suffix), validating each first."""
    path = Path(path)
    rows = list(rows)
    for i, row in enumerate(rows):
        validate_row(row, where=f"row {i}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist([dict(r) for r in rows]), path)
    elif path.suffix == ".jsonl":
        with path.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    else:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .parquet or .jsonl")
    return path
