"""One logger object for metrics: a console line per step, JSONL always, TensorBoard and W&B when enabled.

Metric names are flat and namespaced (``reward/``, ``actor/``, ``flowrl/``, ``rollout/``, ``perf/``,
``optim/``; every name is listed in ``docs/metrics.md``), the same names in the console, the JSONL file,
TensorBoard and W&B.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

CONSOLE_KEYS = (
    ("reward/mean", "reward"),
    ("reward/accuracy", "acc"),
    ("actor/loss", "loss"),
    ("flowrl/log_z", "log_z"),
    ("actor/ref_kl", "kl"),
    ("rollout/response_length", "len"),
    ("reward/failed", "failed"),
    ("perf/step_time_s", "time"),
)


def format_duration(seconds: float) -> str:
    """``0.0412s``, ``8.12s``, ``12m05s``, ``3h07m``: three significant figures below a minute."""
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_step_line(step: int, total: int, metrics: dict[str, float], eta_s: float | None = None) -> str:
    """``step 12/200 | reward 0.61 | acc 0.5 | loss 0.41 | log_z 0.3 | len 31 | 8.12s | eta 25m27s``."""
    parts = [f"step {step}/{total}"]
    for key, label in CONSOLE_KEYS:
        if key not in metrics:
            continue
        value = metrics[key]
        if key == "perf/step_time_s":
            parts.append(format_duration(value))
        elif key == "reward/failed":
            if value:
                parts.append(f"{label} {int(value)}")
        else:
            parts.append(f"{label} {value:.4g}")
    if eta_s is not None and step < total:
        parts.append(f"eta {format_duration(eta_s)}")
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
        resume_step: with ``append``, the step resumed from: JSONL lines and TensorBoard events of later
            steps (written before a crash) are dropped, so no step appears twice.
        progress: a whole-run progress bar with the ETA when stderr is a terminal (console lines are
            written above it); in a piped log, plain lines that end with the ETA.
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
        progress: bool = True,
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

            # purge_step hides events of steps past the checkpoint that an earlier writer logged
            purge = resume_step + 1 if append else None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)
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
        self._first_step = resume_step
        self._started = time.perf_counter()
        self._bar = None
        if progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=resume_step, desc="train", unit="step", dynamic_ncols=True
            )

    def eta_s(self, step: int) -> float | None:
        """Seconds left, from the mean step time of this session's steps (None before the first)."""
        done = step - self._first_step
        if done < 1:
            return None
        return (time.perf_counter() - self._started) / done * (self.total_steps - step)

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
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
        if console:
            self.write(format_step_line(step, self.total_steps, metrics, self.eta_s(step)))

    def write(self, text: str) -> None:
        """A console line that does not tear the progress bar."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text)
        sys.stdout.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
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
    ("actor/loss", "loss"),
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
