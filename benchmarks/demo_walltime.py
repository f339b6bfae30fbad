"""Wall time of the embedded demo, as `make demo` runs it, in a fresh process.

    .venv/bin/python benchmarks/demo_walltime.py --json outputs/demo_walltime.json [--compare]

Runs ``flowrl demo`` (with ``--compare``: FlowRL and GRPO) in a subprocess with the torch thread count
the machine gives it, in a fresh output directory, and reports the wall time of the whole command (model
build, SFT warm-up, RL, evaluation, plot) against the goal of 5 minutes on 2 CPU cores, together with the
demo's own table (read from its ``--json`` output).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL_S = 300.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare", action="store_true", help="time `flowrl demo --compare`")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        command = [sys.executable, "-m", "flowrl.commands", "demo", "--output-dir", str(out / "demo")]
        command += ["--json", str(out / "demo.json")] + (["--compare"] if args.compare else [])
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        demo = json.loads((out / "demo.json").read_text())

    import torch

    result = {
        "command": "flowrl demo" + (" --compare" if args.compare else ""),
        "wall_time_s": round(wall, 1),
        "goal_s": GOAL_S,
        "meets_goal": wall < GOAL_S,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "results": demo["results"],
    }
    print(f"{result['command']}: {wall:.1f}s wall on {os.cpu_count()} CPUs (goal < {GOAL_S:.0f}s)")
    for name, metrics in demo["results"].items():
        print(f"  {name:<12} " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
