"""Runs of one model under several seeds: where they live, what they logged, and their mean and
spread in a markdown table and a figure with bands (tools/convergence.py, tools/finetune_demo.py).

A run's folder is <work>/<model>_seed<seed>; its log.txt is main.py's (one line per evaluated
epoch) and wall_seconds.txt the time it took. Figures are in percent.
"""
import json
import statistics
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAT_INDEX = {"AP": 0, "AP50": 1, "AP75": 2}  # in log.txt's test_coco_eval_bbox


class Model(NamedTuple):
    name: str        # run folder and legend
    label: str       # what the table calls it
    flags: Sequence[str]


def read_log(run_dir: Path) -> List[dict]:
    """main.py's log.txt of a run, one dict per line ([] when there is none yet)."""
    log = run_dir / "log.txt"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def run_dir(work: Path, model: Model, seed: int) -> Path:
    return work / f"{model.name}_seed{seed}"


def epochs_done(work: Path, model: Model, seed: int) -> int:
    return len(read_log(run_dir(work, model, seed)))


def curves(work: Path, model: Model, seeds: Sequence[int], stat: str) -> List[List[float]]:
    """[seed][epoch]: the stat after each evaluated epoch, in percent."""
    return [[100 * line["test_coco_eval_bbox"][STAT_INDEX[stat]] for line in read_log(run_dir(work, model, seed))]
            for seed in seeds]


def final(work: Path, model: Model, seeds: Sequence[int], stat: str) -> List[float]:
    """The stat after the last epoch, one value per seed."""
    return [curve[-1] for curve in curves(work, model, seeds, stat)]


def spread(values: Sequence[float]) -> str:
    """mean ± standard deviation (over seeds)."""
    deviation = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.1f} ± {deviation:.1f}"


def minutes(work: Path, model: Model, seeds: Sequence[int]) -> Optional[float]:
    """The mean wall time of one run, in minutes (None when no run recorded it)."""
    walls = [run_dir(work, model, s) / "wall_seconds.txt" for s in seeds]
    values = [float(w.read_text()) / 60 for w in walls if w.exists()]
    return statistics.mean(values) if values else None


def table(work: Path, models: Sequence[Model], seeds: Sequence[int], epochs: int,
          extra: Callable[[Model], List[str]] = lambda model: [], extra_head: Sequence[str] = ()) -> str:
    """One row per model: `extra_head` columns from `extra(model)`, AP50 after every epoch and the
    last epoch's AP and AP75 as mean ± deviation, the last AP50 of each seed, the minutes of a run."""
    head = (["model", *extra_head] + [f"AP50 e{e + 1}" for e in range(epochs)]
            + [f"AP e{epochs}", f"AP75 e{epochs}", f"AP50 e{epochs} per seed", "minutes (one run)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model in models:
        ap50 = curves(work, model, seeds, "AP50")
        run_minutes = minutes(work, model, seeds)
        cells = ([model.label, *extra(model)] + [spread([c[e] for c in ap50]) for e in range(epochs)]
                 + [spread(final(work, model, seeds, stat)) for stat in ("AP", "AP75")]
                 + [", ".join(f"{c[-1]:.1f}" for c in ap50),
                    f"{run_minutes:.1f}" if run_minutes is not None else "-"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\nmean ± standard deviation over seeds {', '.join(map(str, seeds))}\n"


def figure(work: Path, models: Sequence[Model], seeds: Sequence[int], path: Path, title: str,
           stats: Sequence[str] = ("AP50", "AP")) -> None:
    """One panel per stat: each model's mean over seeds against epoch, with a band from the lowest
    to the highest seed."""
    fig, axes = plt.subplots(1, len(stats), figsize=(8, 3.2), dpi=80)
    for ax, stat in zip(axes, stats):
        for model in models:
            per_epoch = list(zip(*curves(work, model, seeds, stat)))
            epochs = list(range(1, len(per_epoch) + 1))
            line, = ax.plot(epochs, [statistics.mean(v) for v in per_epoch], marker="o", label=model.name)
            ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch],
                            color=line.get_color(), alpha=0.2)
            ax.set_xticks(epochs)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{stat} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


AGREES, DISAGREES, CANNOT_TELL = "agrees", "disagrees", "cannot tell"


def verdict(better: Sequence[float], worse: Sequence[float]) -> str:
    """Whether runs bear out "`better` beats `worse`": only when every seed of one lies above every
    seed of the other (the two ranges do not overlap) is a difference called."""
    if min(better) > max(worse):
        return AGREES
    if max(better) < min(worse):
        return DISAGREES
    return CANNOT_TELL
