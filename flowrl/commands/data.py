"""``flowrl data prepare`` / ``flowrl data list``: public datasets -> verl's parquet schema.

The command: flags, the dataset list and the summary printed, the exit status (1 when nothing could be
prepared, the reason on stderr). Reading, converting and the skip report are :mod:`flowrl.data.prepare`;
each dataset's layout and converter :mod:`flowrl.data.converters`.
"""

from __future__ import annotations

import argparse
import sys

from flowrl.data.converters import DATASET_ALIASES, DATASETS, dataset_names_text, resolve_dataset_name
from flowrl.data.prepare import prepare_dataset
from flowrl.data.templates import TEMPLATES


def list_datasets() -> str:
    """The text of ``flowrl data list``."""
    lines = []
    for spec in DATASETS.values():
        aliases = DATASET_ALIASES[spec.name]
        lines += [
            f"{spec.name:<14} {spec.title} [{spec.ability}, {spec.purpose}] from {spec.hub_id}"
            + (f" (configs {spec.hub_config})" if spec.hub_config else ""),
            f"{'':<14} columns: {spec.expected_columns()}   template: {spec.default_template}   "
            f"split: {spec.default_split}   dedupe: {'on' if spec.dedupe else 'off'}",
            f"{'':<14} {spec.layout}",
            *([f"{'':<14} aliases: {', '.join(aliases)}"] if aliases else []),
            "",
        ]
    lines.append("templates: " + "; ".join(f"{k} ({v})" for k, v in TEMPLATES.items()))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``flowrl data`` (``list`` and ``prepare``), built without running anything."""
    parser = argparse.ArgumentParser(
        prog="flowrl data", description="Prepare public datasets in verl's schema."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the datasets, their expected columns and defaults")
    p = sub.add_parser(
        "prepare",
        help="convert a dataset to verl's parquet schema",
        description="Convert a public dataset to verl's parquet schema.",
        epilog="datasets, with their aliases in parentheses (a dataset's hub id works too; case, '-' and\n"
        "'_' do not matter; rows get the first name as data_source):\n  " + dataset_names_text(sep="\n  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", help="dataset name or alias (listed below; `flowrl data list` for details)")
    p.add_argument("--input", required=True, help="a file, a directory, or hub:ORG/NAME")
    p.add_argument("--output", help="output .parquet or .jsonl (default data/NAME_SPLIT.parquet)")
    p.add_argument("--template", choices=sorted(TEMPLATES), help="prompt template (default: the dataset's)")
    p.add_argument("--split", help="written to extra_info.split (default: train or test by dataset)")
    p.add_argument("--limit", type=int, help="write at most this many rows")
    p.add_argument("--report", help="skip report, JSON Lines (default OUTPUT.report.jsonl)")
    p.add_argument("--max-tests", type=int, help="code: keep at most this many tests, the longest inputs")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--dedupe",
        dest="dedupe",
        action="store_true",
        default=None,
        help="drop repeated problems (default for training sets)",
    )
    group.add_argument("--no-dedupe", dest="dedupe", action="store_false", help="keep repeated problems")
    p.add_argument("--config", help="hub input: configuration(s), comma-separated (default: the dataset's)")
    p.add_argument("--hub-split", help="hub input: split to load (default: the dataset's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``flowrl data``; ``argv`` starts with ``prepare`` or ``list``."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "list":
        print(list_datasets())
        return 0
    try:
        result, output, report = prepare_dataset(
            args.name,
            args.input,
            output=args.output,
            report=args.report,
            template=args.template,
            split=args.split,
            limit=args.limit,
            dedupe=args.dedupe,
            max_tests=args.max_tests,
            config=args.config,
            hub_split=args.hub_split,
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"flowrl data prepare: error: {exc}", file=sys.stderr)
        return 1
    summary = result.summary()
    name = resolve_dataset_name(args.name)
    print(
        f"{name}: read {summary['read']} rows, wrote {summary['written']} to {output}; "
        f"skipped {summary['skipped']}; duplicates removed {summary['duplicates_removed']}"
        + (f" ({summary['conflicting_duplicates']} with a different answer)" if result.conflicts else "")
    )
    for reason, count in summary["skipped_by_reason"].items():
        print(f"  skipped {count}: {reason}")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
