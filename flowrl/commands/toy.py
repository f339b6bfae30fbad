"""``flowrl toy``: the paper's illustrative experiment (Figure 1), FlowRL against reward maximizers.

The command: flags, the table and the files. The experiment itself (the target, the methods' losses,
the training loop, the metrics, the figure) is :mod:`flowrl.toy`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowrl.toy import DEFAULT_METHODS, METHODS, ToyConfig, format_table, plot_toy, run_toy


def _list_of(cast: Callable[[str], Any], what: str, example: str) -> Callable[[str], tuple[Any, ...]]:
    """An argparse type for comma-separated values, refusing with an example of the format."""

    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(cast(part) for part in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected comma-separated {what} such as {example}"
            ) from None

    return parse


_int_list = _list_of(int, "integers", "20,50,80")
_float_list = _list_of(float, "numbers", "1,2,1")


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``flowrl toy``, built without running anything."""
    defaults = ToyConfig()
    parser = argparse.ArgumentParser(
        prog="flowrl toy",
        description="The paper's illustrative experiment (Figure 1): a categorical policy over the "
        "states 0..100 trained towards a multi-modal target with reward log p*(x), by FlowRL (distribution "
        "matching) and by reward maximizers (GRPO, REINFORCE++, PPO), all with the same steps, samples "
        "and learning rate.",
    )
    parser.add_argument(
        "--modes", type=_int_list, default=defaults.modes, help="mode centres (default 20,50,80)"
    )
    parser.add_argument(
        "--weights", type=_float_list, default=defaults.weights, help="mode masses (default 1,2,1)"
    )
    parser.add_argument(
        "--width", type=float, default=defaults.width, help="bump std in states (default %(default)s)"
    )
    parser.add_argument(
        "--steps", type=int, default=defaults.steps, help="steps per method (default %(default)s)"
    )
    parser.add_argument(
        "--samples-per-step",
        type=int,
        default=defaults.samples_per_step,
        help="samples per step (default %(default)s)",
    )
    parser.add_argument(
        "--lr", type=float, default=defaults.lr, help="Adam learning rate (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="sampling seed (default %(default)s)")
    parser.add_argument(
        "--methods",
        type=_name_list,
        default=defaults.methods,
        help=f"subset of {','.join(METHODS)} (default {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH", help="draw Figure 1 to a PNG")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``flowrl toy``: run the experiment, print the table, optionally save JSON and a plot.

    Returns:
        0 on success, 2 on bad arguments (with a message naming the fix on stderr).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        try:
            cfg = ToyConfig(
                modes=args.modes,
                weights=args.weights,
                width=args.width,
                steps=args.steps,
                samples_per_step=args.samples_per_step,
                lr=args.lr,
                seed=args.seed,
                methods=args.methods,
            )
        except ValueError as exc:
            parser.error(str(exc))
    except SystemExit as exc:  # argparse exits on --help (0) and on bad input (2): return the code instead
        return exc.code if isinstance(exc.code, int) else 2
    modes, weights = ",".join(map(str, cfg.modes)), ",".join(f"{w:g}" for w in cfg.weights)
    print(
        f"flowrl toy | modes {modes} | weights {weights} | width {cfg.width:g} | "
        f"{cfg.steps} steps x {cfg.samples_per_step} samples | lr {cfg.lr:g} | seed {cfg.seed}"
    )
    start = time.perf_counter()
    result = run_toy(cfg, verbose=True)
    print()
    print(format_table(result))
    print(f"\ntotal {time.perf_counter() - start:.1f}s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot is not None:
        plot_toy(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
