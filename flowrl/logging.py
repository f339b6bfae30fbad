"""One logger object for metrics: a console line per step, JSONL always, TensorBoard and W&B when enabled.

Metric names are flat and namespaced (``reward/``, ``flowrl/``, ``rollout/``, ``perf/``, ``optim/``), the
same names in the console, the JSONL file, TensorBoard and W&B.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

CONSOLE_KEYS = (
    ("reward/mean", "reward"),
    ("loss", "loss"),
    ("flowrl/log_z", "log_z"),
    ("rollout/response_length", "len"),
    ("reward/failed", "failed"),
    ("perf/step_time_s", "time"),
)


def format_step_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """``step 12/200 | reward 0.61 | loss 0.41 | log_z 0.3 | len 31 | 8.1s``."""
    parts = [f"step {step}/{total}"]
    for key, label in CONSOLE_KEYS:
        if key not in metrics:
            continue
        value = metrics[key]
        if key == "perf/step_time_s":
            parts.append(f"{value:.1f}s")
        elif key == "reward/failed":
            if value:
                parts.append(f"{label} {int(value)}")
        else:
            parts.append(f"{label} {value:.4g}")
    return " | ".join(parts)


class MetricsLogger:
    """Writes each step's flat metrics dict to ``metrics.jsonl`` (and TensorBoard / W&B).

    Args:
        run_dir: where ``metrics.jsonl`` and the TensorBoard events go.
        total_steps: for the console line.
        tensorboard: write TensorBoard events.
        wandb_project: W&B project; used when set and ``wandb`` is importable (else a note is printed).
        config: the resolved config, sent to W&B.
        append: keep earlier lines (resume) instead of starting a new file.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        total_steps: int,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        config: dict[str, Any] | None = None,
        append: bool = False,
        resume_step: int = 0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.path = self.run_dir / "metrics.jsonl"
        if append and self.path.exists():
            # Drop lines past the checkpoint we resume from: those steps are about to be redone.
            kept = [
                line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._wandb = None
        if wandb_project:
            try:
                import wandb
            except ImportError:
                print(
                    "note: train.wandb_project is set but wandb is not installed; `pip install wandb`",
                    file=sys.stderr,
                )
            else:
                self._wandb = wandb.init(project=wandb_project, config=config, dir=str(self.run_dir))

    def log(self, step: int, metrics: dict[str, float], *, console: bool = True) -> None:
        """Record one step's metrics and print its console line."""
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for key, value in clean.items():
                if value is not None:
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if console:
            print(format_step_line(step, self.total_steps, metrics), flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


PLOT_PANELS = (
    ("reward/mean", "reward"),
    ("loss", "loss"),
    ("flowrl/log_z", "log Z"),
    ("rollout/response_length", "response length"),
)


def plot_metrics(metrics_path: str | Path, out_path: str | Path) -> Path:
    """A PNG of reward, loss, log Z and response length over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(PLOT_PANELS), figsize=(4 * len(PLOT_PANELS), 3.2))
    for ax, (key, title) in zip(axes, PLOT_PANELS, strict=False):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
