"""Same-budget convergence comparison and Semantics Aligner ablations on the quick start's task.

Trains every model of a set with one command line (the same backbone, widths, data, steps,
learning rates and loss weights), changing only the model's own flags, evaluates after every
epoch, and writes a figure of AP50 and AP against epoch and a markdown table:

    python tools/convergence.py --set comparison --out docs   # SAM-DETR, + SMCA, no SAM, DETR
    python tools/convergence.py --set ablations --out docs    # the paper's Semantics Aligner rows

The data is the quick start's (tools/make_synthetic_coco.py, made under --data when missing).
Runs go to --work/<model>; a run whose log already holds every epoch is read, not trained again
(--retrain trains it anyway). The models run at single scale (DETR has no multi-scale form), on
the C5 map of ~128-pixel images. It is an experiment, not a test: on a task this small and
this short the ranking can differ from the paper's COCO figures, and docs/ablations.md says what it shows.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datasets.synthetic import CATEGORIES, make_synthetic_coco  # noqa: E402

# The quick start's data (README, "Quick start").
DATA = {"num_train": 1600, "num_val": 100, "image_size": 96, "seed": 0}
NUM_CLASSES = max(c["id"] for c in CATEGORIES) + 1

# One training setting for every model: the quick start's, at single scale (see the module doc).
COMMON_FLAGS = (
    "--device cpu --backbone resnet18 --no_pretrained_backbone --backbone_norm batch "
    "--enc_layers 1 --dec_layers 3 --hidden_dim 64 --nheads 4 --dim_feedforward 128 --num_queries 20 "
    "--scales 112 128 --max_size 160 --val_size 128 --dropout 0 --cls_loss_coef 8 "
    "--lr 5e-4 --lr_backbone 5e-4 --epochs 4 --lr_drop 3 --batch_size 4 --num_workers 0 "
    "--eval_every_epoch 1 --save_every_epoch 0 --print_freq 100 --seed 42"
).split()


class Model(NamedTuple):
    name: str        # run folder and legend
    label: str       # what the table calls it
    flags: Sequence[str]


SETS: Dict[str, List[Model]] = {
    "comparison": [
        Model("sam_detr", "SAM-DETR", []),
        Model("sam_detr_smca", "SAM-DETR w/ SMCA", ["--smca"]),
        Model("no_sam", "baseline: no Semantics Aligner (`--no_sam`)", ["--no_sam"]),
        Model("detr", "DETR (`--meta_arch detr`)", ["--meta_arch", "detr"]),
    ],
    "ablations": [
        Model("sam_detr", "SAM-DETR (salient points in the box, reweighting, one point per head)", []),
        Model("sam_search_image", "points searched over the whole image (`--sam_search image`)",
              ["--sam_search", "image"]),
        Model("no_sam_reweight", "no reweighting (`--no_sam_reweight`)", ["--no_sam_reweight"]),
        Model("sam_points_1", "one salient point (`--sam_points 1`)", ["--sam_points", "1"]),
        Model("sam_resample_avgpool", "RoI average pooling (`--sam_resample avgpool`)", ["--sam_resample", "avgpool"]),
        Model("sam_resample_maxpool", "RoI max pooling (`--sam_resample maxpool`)", ["--sam_resample", "maxpool"]),
        Model("no_sam", "no Semantics Aligner (`--no_sam`)", ["--no_sam"]),
    ],
}


def epochs_of(flags: Sequence[str]) -> int:
    return int(flags[list(flags).index("--epochs") + 1])


def read_log(run_dir: Path) -> List[dict]:
    log = run_dir / "log.txt"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def train(model: Model, data: Path, run_dir: Path, threads: Optional[int] = None,
          common_flags: Sequence[str] = COMMON_FLAGS, num_classes: int = NUM_CLASSES) -> float:
    """Trains one model in a fresh process (with `threads` CPU threads, default torch's) with
    `common_flags` and the model's own; returns its wall time in seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.txt").unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "main.py"), "--coco_path", str(data), "--num_classes", str(num_classes),
           *common_flags, *model.flags, "--output_dir", str(run_dir)]
    print(f"[{model.name}] {' '.join(cmd[1:])}", flush=True)
    start = time.time()
    with (run_dir / "stdout.txt").open("w") as out:
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        done = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.time() - start
    if done.returncode:
        raise SystemExit(f"[{model.name}] failed (exit {done.returncode}); see {run_dir / 'stdout.txt'}")
    (run_dir / "wall_seconds.txt").write_text(f"{seconds:.0f}\n")
    print(f"[{model.name}] {seconds:.0f} s", flush=True)
    return seconds


def results(model: Model, run_dir: Path) -> dict:
    log = read_log(run_dir)
    stats = [line["test_coco_eval_bbox"] for line in log]
    wall = run_dir / "wall_seconds.txt"
    return {"model": model, "AP": [s[0] for s in stats], "AP50": [s[1] for s in stats], "AP75": [s[2] for s in stats],
            "params": log[-1]["n_parameters"], "seconds": float(wall.read_text()) if wall.exists() else float("nan")}


def table(rows: Sequence[dict]) -> str:
    epochs = len(rows[0]["AP50"])
    head = ["model", "flags", "params"] + [f"AP50 e{e + 1}" for e in range(epochs)] + ["AP", "AP75", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        flags = " ".join(r["model"].flags) or "(none)"
        cells = ([r["model"].label, f"`{flags}`", f"{r['params'] / 1e6:.2f} M"]
                 + [f"{100 * v:.1f}" for v in r["AP50"]]
                 + [f"{100 * r['AP'][-1]:.1f}", f"{100 * r['AP75'][-1]:.1f}", f"{r['seconds'] / 60:.1f}"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(rows: Sequence[dict], path: Path, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=80)
    for ax, stat in zip(axes, ("AP50", "AP")):
        for r in rows:
            epochs = range(1, len(r[stat]) + 1)
            ax.plot(epochs, [100 * v for v in r[stat]], marker="o", label=r["model"].name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{stat} (%)")
        ax.set_xticks(list(range(1, len(rows[0][stat]) + 1)))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(SETS) + ["all"], default="comparison")
    parser.add_argument("--data", type=Path, default=Path("data/shapes"), help="the quick start's data (made if missing)")
    parser.add_argument("--work", type=Path, default=Path("output/convergence"), help="one run folder per model")
    parser.add_argument("--out", type=Path, default=Path("output/convergence"),
                        help="where convergence.png / ablations.png and the tables (.md) go")
    parser.add_argument("--retrain", action="store_true", help="train even the models whose runs are complete")
    parser.add_argument("--jobs", type=int, default=1,
                        help="models trained at once, each with cores / jobs threads (small models use two "
                             "cores better as two one-thread runs; float rounding differs with the thread count)")
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, List[dict]]:
    args = parse_args(argv)
    if not (args.data / "annotations").exists():
        make_synthetic_coco(out_dir=args.data, **DATA)
    args.out.mkdir(parents=True, exist_ok=True)
    names = list(SETS) if args.set == "all" else [args.set]  # the comparison first
    everything = {}
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    done = set()
    for name in names:
        # each set trains what it needs that no earlier set trained (the ablations share two models)
        todo = [m for m in SETS[name] if m.name not in done
                and (args.retrain or len(read_log(args.work / m.name)) < epochs_of(COMMON_FLAGS))]
        start = time.time()
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(lambda m: train(m, args.data, args.work / m.name, threads), todo))
        done.update(m.name for m in todo)
        if todo:
            print(f"{name}: trained {len(todo)} models in {(time.time() - start) / 60:.1f} minutes "
                  f"({args.jobs} at a time)", flush=True)
        rows = [results(model, args.work / model.name) for model in SETS[name]]
        stem = "convergence" if name == "comparison" else name
        title = ("Same budget, quick start task (single scale)" if name == "comparison"
                 else "Semantics Aligner ablations, quick start task")
        figure(rows, args.out / f"{stem}.png", title)
        text = table(rows)
        (args.out / f"{stem}.md").write_text(text + "\n")
        print(text)
        everything[name] = rows
    return everything


if __name__ == "__main__":
    main()
