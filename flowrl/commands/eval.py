"""``flowrl eval``: avg@n, pass@k, maj@n and diversity of models on benchmarks, in a table and files.

The command: flags (one :class:`~flowrl.evaluation.run.EvalConfig` field each), the table printed at
the end and the exit status (2 for input that cannot work, the reason on stderr). The runner, its
resumable files and its decisions are :mod:`flowrl.evaluation.run`; the metrics
:mod:`flowrl.evaluation.metrics`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flowrl.evaluation import report
from flowrl.evaluation.run import PLOT_FILE, REPORT_FILE, RESULTS_FILE, EvalConfig, run_eval


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``flowrl eval``, built without running anything."""
    d = EvalConfig
    p = argparse.ArgumentParser(
        prog="flowrl eval",
        description="Sample n responses per problem, score them, and report avg@n, pass@k, maj@n and "
        "diversity (defaults: the paper's 16 samples, temperature 0.6, top_p 0.95).",
        epilog="example: flowrl eval --model runs/flowrl --model base=Qwen/Qwen2.5-7B "
        "--data data/aime24.parquet data/math500.parquet --output-dir outputs/eval",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="model dir, hub id, training run dir (its newest checkpoint) or checkpoint; repeat to compare",
    )
    p.add_argument("--data", nargs="+", required=True, help="one parquet/jsonl file per benchmark")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--n", type=int, default=d.n, help="samples per problem (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="(default: %(default)s)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="(default: %(default)s)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 disables top-k (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="(default: %(default)s)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="sequences per generate call (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--reward", help="module:function for every row (default: by data_source)")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="reward worker processes")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1 ... (default: %(default)s)")
    p.add_argument("--dtype", default=d.dtype, help="auto, float32, bfloat16, float16 (default: %(default)s)")
    p.add_argument("--limit", type=int, help="only the first N problems of each file")
    p.add_argument(
        "--rescore",
        action="store_true",
        help="score and report the saved generations again without generating (no model is loaded)",
    )
    p.add_argument("--no-entropy", dest="entropy", action="store_false", help="skip the token-entropy pass")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = EvalConfig(
            models=args.model,
            data=args.data,
            output_dir=args.output_dir,
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            seed=args.seed,
            reward=args.reward,
            num_workers=args.num_workers,
            device=args.device,
            dtype=args.dtype,
            limit=args.limit,
            rescore=args.rescore,
            entropy=args.entropy,
        )
        results = run_eval(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"flowrl eval: error: {exc}", file=sys.stderr)
        return 2
    out = Path(cfg.output_dir)
    print()
    print(report.format_table(results))
    print(f"\nresults: {out / RESULTS_FILE} | report: {out / REPORT_FILE} | plot: {out / PLOT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
