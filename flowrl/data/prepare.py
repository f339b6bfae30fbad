"""Public datasets -> verl's parquet schema: reading inputs, converting, writing rows and the skip report.

:func:`prepare_dataset` does the work of ``flowrl data prepare`` (the command, with ``flowrl data
list``, is :mod:`flowrl.commands.data`)::

    flowrl data list
    flowrl data prepare aime24 --input aime_2024.parquet --output data/aime24.parquet
    flowrl data prepare math_dapo --input hub:BytedTsinghua-SIA/DAPO-Math-17k --template dapo

The input is a file (``.parquet``, ``.jsonl``, ``.json``: a list of records, one record, or JSON
Lines), a directory (every such file under it, sorted; e.g. MATH's one-JSON-file-per-problem
release), or ``hub:ORG/NAME`` to load with the ``datasets`` library (needs the network; ``--config``
and ``--hub-split`` choose what to load). Nothing is dropped silently: rows that cannot be used
(missing answer, empty problem, unparsable tests) are counted, and the report file (JSON Lines,
``OUTPUT.report.jsonl`` unless ``--report`` says otherwise) names each one (input row, identifying
field, reason); repeated problems removed by deduplication are counted separately, and a repeated
problem whose answer differs from the kept one is named in the report.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowrl.data.converters import (
    DATASETS,
    DatasetSpec,
    SkipRow,
    limit_tests,
    resolve_dataset_name,
    row_identifier,
)
from flowrl.data.schema import write_rows
from flowrl.data.templates import check_template, render_prompt

INPUT_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".json")
HUB_PREFIX = "hub:"
PARQUET_BATCH_ROWS = 8192  # rows read at a time: DAPO-Math-17k's public file has ~1.8M rows


@dataclass
class PrepareResult:
    """What :func:`convert_records` produced and what it left out.

    Attributes:
        rows: the converted rows in verl's schema.
        num_read: input records seen.
        skipped: one dict per unusable record: ``row`` (0-based input position), ``file``, ``id``, ``reason``.
        num_duplicates: repeated problems removed by deduplication.
        conflicts: repeated problems whose ground truth differs from the kept one (also counted in
            ``num_duplicates``): ``row``, ``file``, ``id``, ``kept_row``, ``ground_truth``,
            ``kept_ground_truth``.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    num_read: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)
    num_duplicates: int = 0
    conflicts: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        reasons = Counter(s["reason"] for s in self.skipped)
        return {
            "kind": "summary",
            "read": self.num_read,
            "written": len(self.rows),
            "skipped": len(self.skipped),
            "skipped_by_reason": dict(reasons.most_common()),
            "duplicates_removed": self.num_duplicates,
            "conflicting_duplicates": len(self.conflicts),
        }


# ---------------------------------------------------------------------------------------------
# Reading inputs


def _iter_json_file(path: Path) -> Iterator[dict[str, Any]]:
    if path.suffix in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(path)
        return
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        if exc.msg.startswith("Extra data"):  # JSON Lines saved as .json
            yield from _iter_jsonl(path)
            return
        raise ValueError(f"{path}: not valid JSON ({exc}); fix or re-download the file") from exc
    if isinstance(data, list):
        records = data
    elif isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        records = next(iter(data.values()))  # {"data": [...]}
    elif isinstance(data, dict):
        records = [data]  # one record per file (the MATH release)
    else:
        raise ValueError(
            f"{path}: expected a JSON list of records or one record, found {type(data).__name__}"
        )
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}: record {i} is a {type(record).__name__}, expected an object of columns"
            )
        yield record


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{line_no}: not valid JSON ({exc.msg}); fix or re-download the file"
                ) from exc
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object of columns")
            yield record


def _iter_parquet(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS):
        yield from batch.to_pylist()


def input_files(path: Path) -> list[Path]:
    """The data files of an input path: the file itself, or every data file under a directory."""
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in INPUT_SUFFIXES)
        if not files:
            raise ValueError(f"{path}: no {'/'.join(INPUT_SUFFIXES)} files in this directory")
        return files
    if path.suffix not in INPUT_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {list(INPUT_SUFFIXES)}")
    return [path]


def iter_file_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(file name, record)`` for every record of a file or of every data file under a directory."""
    for file in input_files(Path(path)):
        reader = _iter_parquet if file.suffix == ".parquet" else _iter_json_file
        for record in reader(file):
            yield str(file), record


def iter_hub_records(name: str, configs: str | None, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(source, record)`` from a hub dataset (``configs``: one or several, comma-separated)."""
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(
            "reading from the hub needs the `datasets` package: pip install 'flowrl[data]'"
        ) from exc
    for config in configs.split(",") if configs else [None]:
        source = f"hub:{name}" + (f"/{config}" if config else "") + f"[{split}]"
        for record in datasets.load_dataset(name, config, split=split):
            yield source, dict(record)


# ---------------------------------------------------------------------------------------------
# Converting


def check_columns(spec: DatasetSpec, found: Iterable[str], where: str) -> None:
    """Raise ``ValueError`` naming the expected and found columns when a file is in the wrong layout."""
    found = list(found)
    missing = spec.missing_columns(found)
    if missing:
        raise ValueError(
            f"{where}: this does not look like {spec.title} ({spec.hub_id}): missing column(s) {missing}. "
            f"Expected columns: {spec.expected_columns()} ('a|b' = either); found: {sorted(found)}. "
            f"Check the dataset name (`flowrl data list`) or the input file."
        )


def _dedupe_key(text: str) -> str:
    return " ".join(text.split())


def convert_records(
    name: str,
    records: Iterable[tuple[str, Mapping[str, Any]]],
    *,
    template: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    dedupe: bool | None = None,
    max_tests: int | None = None,
) -> PrepareResult:
    """Convert ``(source, record)`` pairs of dataset ``name`` into rows of verl's schema.

    Args:
        name: a key of :data:`flowrl.data.converters.DATASETS` or one of its aliases; the rows'
            ``data_source`` is the canonical name (the key).
        records: the published records, each with the file (or hub source) it came from; the
            columns are checked on the first record of every source.
        template: prompt template (default: the dataset's, see ``flowrl data list``).
        split: written to ``extra_info.split`` (default: ``train`` for training sets, ``test`` otherwise).
        limit: stop after this many rows are written.
        dedupe: drop problems whose text (up to whitespace) was already seen; default: on for
            training sets, off for benchmarks.
        max_tests: code only: keep at most this many input/output tests (the longest inputs).

    Returns:
        A :class:`PrepareResult` with the rows, the skipped records and the deduplication counts.

    Raises:
        ValueError: unknown dataset, a template that does not fit, a bad ``limit``/``max_tests``, or
            a source whose columns are not the dataset's.
    """
    spec = get_spec(name)
    template = template or spec.default_template
    check_template(template, spec.ability)
    split = split or spec.default_split
    dedupe = spec.dedupe if dedupe is None else dedupe
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1 (got {limit})")
    if max_tests is not None and max_tests < 1:
        raise ValueError(f"--max-tests must be >= 1 (got {max_tests})")

    result = PrepareResult()
    seen: dict[str, tuple[int, str]] = {}  # dedupe key -> (input row, ground truth)
    checked: set[str] = set()
    for row_no, (source, record) in enumerate(records):
        if source not in checked:
            check_columns(spec, record.keys(), source)
            checked.add(source)
        result.num_read += 1
        try:
            problem = spec.convert(record)
        except SkipRow as exc:
            result.skipped.append(
                {"row": row_no, "file": source, "id": row_identifier(record), "reason": str(exc)}
            )
            continue
        if max_tests is not None and spec.ability == "code":
            problem.ground_truth = limit_tests(problem.ground_truth, max_tests)
        if dedupe:
            key = _dedupe_key(problem.text)
            if key in seen:
                result.num_duplicates += 1
                kept_row, kept_gt = seen[key]
                if kept_gt != problem.ground_truth:
                    result.conflicts.append(
                        {
                            "row": row_no,
                            "file": source,
                            "id": row_identifier(record),
                            "kept_row": kept_row,
                            "ground_truth": problem.ground_truth,
                            "kept_ground_truth": kept_gt,
                        }
                    )
                continue
            seen[key] = (row_no, problem.ground_truth)
        extra_info = {
            "index": len(result.rows),
            "split": split,
            "source_row": row_no,
            "template": template,
            "problem": problem.text,
            **problem.extra,
        }
        if spec.ability == "code":
            extra_info.update(
                test_format=problem.test_format, fn_name=problem.fn_name, starter_code=problem.starter_code
            )
        result.rows.append(
            {
                "prompt": render_prompt(template, problem),
                "data_source": spec.name,
                "ability": spec.ability,
                "reward_model": {"style": "rule", "ground_truth": problem.ground_truth},
                "extra_info": extra_info,
            }
        )
        if limit is not None and len(result.rows) >= limit:
            break
    return result


def get_spec(name: str) -> DatasetSpec:
    """The dataset named ``name`` or one of its aliases (``dapo_math`` is ``math_dapo``)."""
    return DATASETS[resolve_dataset_name(name)]


def write_report(result: PrepareResult, path: str | Path) -> Path:
    """Write the skip report: a JSON line per skipped record and per conflicting duplicate, then a summary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for item in result.skipped:
            f.write(json.dumps({"kind": "skipped", **item}) + "\n")
        for item in result.conflicts:
            f.write(json.dumps({"kind": "conflicting_duplicate", **item}) + "\n")
        f.write(json.dumps(result.summary()) + "\n")
    return path


def prepare_dataset(
    name: str,
    input: str | Path,
    *,
    output: str | Path | None = None,
    report: str | Path | None = None,
    template: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    dedupe: bool | None = None,
    max_tests: int | None = None,
    config: str | None = None,
    hub_split: str | None = None,
) -> tuple[PrepareResult, Path, Path]:
    """Read a published dataset, convert it, and write the rows and the report.

    Args:
        name: dataset name or alias (``flowrl data list``).
        input: a file, a directory, or ``hub:ORG/NAME``.
        output: ``.parquet`` or ``.jsonl``; default ``data/<canonical name>_<split>.parquet``.
        report: the skip report; default ``<output without suffix>.report.jsonl``.
        config, hub_split: hub inputs only: configuration(s) (comma-separated) and split to load;
            default the dataset's (``flowrl data list``).
        template, split, limit, dedupe, max_tests: as in :func:`convert_records`.

    Returns:
        ``(result, output path, report path)``.

    Raises:
        ValueError: see :func:`convert_records`; also when no row could be converted.
        FileNotFoundError: the input does not exist.
    """
    spec = get_spec(name)
    source = str(input)
    if source.startswith(HUB_PREFIX):
        records = iter_hub_records(
            source[len(HUB_PREFIX) :], config or spec.hub_config, hub_split or spec.hub_split
        )
    else:
        records = iter_file_records(source)
    result = convert_records(
        name, records, template=template, split=split, limit=limit, dedupe=dedupe, max_tests=max_tests
    )
    split = split or spec.default_split
    output = Path(output) if output is not None else Path("data") / f"{spec.name}_{split}.parquet"
    report = Path(report) if report is not None else output.with_name(output.stem + ".report.jsonl")
    write_report(result, report)
    if not result.rows:
        raise ValueError(
            f"no usable rows in {source} ({result.num_read} read, {len(result.skipped)} skipped); "
            f"the reasons are in {report}"
        )
    write_rows(result.rows, output)
    return result, output, report
