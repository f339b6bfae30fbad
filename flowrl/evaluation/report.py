"""The report of ``flowrl eval``: console table, Markdown and the pass@k plot, all from ``results.json``.

Each function takes the results dict :func:`flowrl.evaluation.run.run_eval` writes (``models`` ->
label -> ``benchmarks`` -> name -> flat metrics, plus ``mean``), so a report can be redrawn from the
file alone. Correctness is shown in percent with its standard error; diversity as measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flowrl.evaluation.metrics import default_ks

MEAN_ROW = "mean"
STATUSES = ("correct", "wrong", "no_answer", "timeout", "error")
# (metric key without "diversity/", column title, decimals)
DIVERSITY_COLUMNS = (
    ("distinct_answers", "answers", 2),
    ("distinct_correct_answers", "correct answers", 2),
    ("distinct_1", "distinct-1", 3),
    ("distinct_2", "distinct-2", 3),
    ("distinct_3", "distinct-3", 3),
    ("distinct_4", "distinct-4", 3),
    ("self_bleu", "self-BLEU", 3),
    ("token_entropy", "entropy", 3),
)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _percent(summary: Mapping[str, Any], key: str) -> str:
    value, err = summary.get(key), summary.get(f"{key}_stderr")
    if _missing(value):
        return "-"
    return f"{100 * value:.2f}" + ("" if _missing(err) else f" ± {100 * err:.2f}")


def _number(summary: Mapping[str, Any], key: str, decimals: int) -> str:
    value = summary.get(key)
    return "-" if _missing(value) else f"{value:.{decimals}f}"


def _rows(results: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any], int]]:
    """(model, benchmark, summary, n) for every benchmark of every model, then the model's mean."""
    rows = []
    for label, model in results["models"].items():
        for name, summary in model["benchmarks"].items():
            rows.append((label, name, summary, model["n"]))
        if len(model["benchmarks"]) > 1:
            rows.append((label, MEAN_ROW, model["mean"], model["n"]))
    return rows


def _all_ks(results: Mapping[str, Any]) -> list[int]:
    return sorted({k for model in results["models"].values() for k in default_ks(model["n"])})


def correctness_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: avg@n, pass@k for each k, maj@n (percent ± stderr), failed rewards."""
    ks = _all_ks(results)
    headers = ["model", "benchmark", "avg@n", *[f"pass@{k}" for k in ks], "maj@n", "failed rewards"]
    body = []
    for label, name, s, n in _rows(results):
        body.append(
            [
                label,
                name,
                _percent(s, f"avg@{n}"),
                *[_percent(s, f"pass@{k}") for k in ks],
                _percent(s, f"maj@{n}"),
                str(s.get("reward/failed", "-")),
            ]
        )
    return headers, body


def diversity_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: per-problem diversity averaged over problems, plus length and truncation."""
    headers = ["model", "benchmark", *[title for _, title, _ in DIVERSITY_COLUMNS], "tokens", "truncated (%)"]
    body = []
    for label, name, s, _ in _rows(results):
        body.append(
            [
                label,
                name,
                *[_number(s, f"diversity/{key}", d) for key, _, d in DIVERSITY_COLUMNS],
                _number(s, "rollout/response_length", 1),
                _percent(s, "rollout/truncation_rate"),
            ]
        )
    return headers, body


def status_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: reward status counts (every sample gets exactly one); ``all`` sums benchmarks."""
    headers = ["model", "benchmark", *STATUSES]
    body = [
        [
            label,
            "all" if name == MEAN_ROW else name,
            *[str(s.get(f"reward/status_{st}", "-")) for st in STATUSES],
        ]
        for label, name, s, _ in _rows(results)
    ]
    return headers, body


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool = False) -> str:
    """An aligned text table, or a Markdown one."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(out)


def _n_note(results: Mapping[str, Any]) -> str:
    ns = sorted({m["n"] for m in results["models"].values()})
    return f"n = {ns[0]} samples per problem" if len(ns) == 1 else f"n = {ns} samples per problem"


def format_table(results: Mapping[str, Any]) -> str:
    """The console report: correctness, then diversity."""
    return "\n\n".join(
        [
            f"correctness (percent ± standard error over problems; {_n_note(results)})",
            render(*correctness_table(results)),
            "diversity (per problem, averaged over problems)",
            render(*diversity_table(results)),
        ]
    )


def write_markdown(results: Mapping[str, Any], path: str | Path, *, plot_file: str | None = None) -> Path:
    """``report.md``: settings, models, the three tables, the plot and how each number is defined."""
    path = Path(path)
    lines = ["# Evaluation report", ""]
    lines += ["## Models", ""]
    for label, model in results["models"].items():
        s = model["settings"]
        source = f" (checkpoint `{model['checkpoint']}`)" if model.get("checkpoint") else ""
        lines.append(
            f"- **{label}**: `{model['model']}`{source}; n={s['n']}, temperature={s['temperature']}, "
            f"top_p={s['top_p']}, top_k={s['top_k']}, max_new_tokens={s['max_new_tokens']}, seed={s['seed']}"
        )
    lines += ["", "## Benchmarks", ""]
    for name, bench in results["benchmarks"].items():
        lines.append(
            f"- **{name}**: {bench['num_problems']} problems from `{bench['file']}` "
            f"(data_source: {', '.join(bench['data_sources'])})"
        )
    reward = results["settings"].get("reward") or "the reward registry (by data_source)"
    lines += ["", f"Reward: {reward}.", ""]
    lines += [f"## Correctness ({_n_note(results)}; percent ± standard error)", ""]
    lines += [render(*correctness_table(results), markdown=True), ""]
    if plot_file:
        lines += [f"![pass@k]({plot_file})", ""]
    lines += ["## Diversity (per problem, averaged over problems)", ""]
    lines += [render(*diversity_table(results), markdown=True), ""]
    lines += ["## Reward statuses (samples)", ""]
    lines += [render(*status_table(results), markdown=True), ""]
    failures = [
        (label, bench, reasons)
        for label, model in results["models"].items()
        for bench, reasons in model.get("failed_reward_reasons", {}).items()
    ]
    if failures:
        lines += ["**Failed rewards** count as not correct above. Most common reasons:", ""]
        for label, bench, reasons in failures:
            listed = "; ".join(f"{count}x `{detail}`" for detail, count in reasons)
            lines.append(f"- {label} / {bench}: {listed}")
        lines.append("")
    lines += [
        "## Definitions",
        "",
        "- avg@n: mean correctness of the n samples of a problem, averaged over problems (= pass@1).",
        "- pass@k: unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, arXiv 2107.03374).",
        "- maj@n: correctness of the most common extracted final answer (ties: first seen).",
        "- standard error: sample standard deviation of the per-problem values / sqrt(problems); for the "
        "mean over benchmarks (equal weights), sqrt(sum of squared standard errors) / benchmarks.",
        "- answers / correct answers: distinct extracted final answers among the n samples (all / correct "
        "ones); not reported for code.",
        "- distinct-n: unique / total word n-grams pooled over the n samples; self-BLEU: mean BLEU-4 of "
        "each sample against the others (lower = more diverse).",
        f"- entropy: {results['settings'].get('token_entropy', 'token entropy')}.",
        "- a failed reward (status error or timeout) counts as not correct and is listed in the "
        "statuses table.",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


def plot_pass_at_k(results: Mapping[str, Any], path: str | Path) -> dict[str, list[str]]:
    """``pass_at_k.png``: pass@k against k, one panel per benchmark (and the mean), one curve per model.

    Returns:
        The curves drawn: panel title -> model labels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benchmarks = list(results["benchmarks"])
    panels = benchmarks + ([MEAN_ROW] if len(benchmarks) > 1 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    drawn: dict[str, list[str]] = {}
    for ax, panel in zip(axes[0], panels, strict=True):
        drawn[panel] = []
        top = 0.0
        for label, model in results["models"].items():
            summary = model["mean"] if panel == MEAN_ROW else model["benchmarks"].get(panel)
            if summary is None:
                continue
            ks = default_ks(model["n"])
            values = [100 * summary[f"pass@{k}"] for k in ks]
            errors = [100 * (summary.get(f"pass@{k}_stderr") or 0.0) for k in ks]
            ax.errorbar(ks, values, yerr=errors, marker="o", capsize=3, label=label)
            drawn[panel].append(label)
            top = max(top, *(v + e for v, e in zip(values, errors, strict=True)))
        ax.set_xscale("log", base=2)
        ax.set_xticks(_all_ks(results), [str(k) for k in _all_ks(results)])
        ax.set_ylim(0, min(100.0, max(5.0, 1.1 * top)))
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn
