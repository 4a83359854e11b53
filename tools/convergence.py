"""The convergence benchmark: SAM-DETR, its variants, its ablations and DETR trained at one budget
under several seeds, on a generated task small enough for a CPU and built so that the paper's
mechanism has room to act (docs/ablations.md explains each choice with a measurement):

    python tools/convergence.py --set comparison --jobs 2 --out docs   # SAM-DETR, + SMCA, no SAM, DETR
    python tools/convergence.py --set ablations --jobs 2 --out docs    # the Semantics Aligner rows
    python tools/convergence.py --set all --jobs 2 --out docs          # both, and the paper's claims

Every model of a set runs one command line (backbone, widths, data, steps, learning rates, loss
weights) and changes only its own flags; each runs once per --seeds, evaluated after every epoch.
The output is a figure (mean over seeds, with a band from the lowest to the highest seed), a
markdown table (mean ± standard deviation), and with --set all a table of the paper's claims,
each judged "agrees", "disagrees" or "cannot tell" from the seeds' last-epoch AP50 and AP.

Settings (--setting):
  benchmark       ~256-pixel images (a C5 map of about 8 x 8 cells, objects spanning 2 to 4 of them),
                  a ResNet-18 pre-trained on the generated shapes by tools/pretrain_backbone.py
                  (made when missing) and loaded with --backbone_weights under the official
                  frozen BatchNorm, as ImageNet weights are; 4 epochs of 150 steps.
  random_backbone the benchmark with the backbone from random weights and trainable BatchNorm.
  quickstart      the quick start's task: ~128-pixel images (4 x 4 cells), random weights.

Runs go to --work/<setting>/<model>_seed<seed>; a run whose log holds every epoch is read, not
trained again (--retrain trains it anyway). The data and the backbone are made when missing.
"""
import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import seeded_runs  # noqa: E402
from datasets.synthetic import CATEGORIES, make_synthetic_coco  # noqa: E402
from seeded_runs import (AGREES, CANNOT_TELL, DISAGREES, Model, curves, epochs_done, final,  # noqa: E402
                         run_dir, verdict)

NUM_CLASSES = max(c["id"] for c in CATEGORIES) + 1
SEEDS = (42, 43, 44)
BACKBONE = Path("output/backbones/resnet18_shapes.pth")  # tools/pretrain_backbone.py's default run

# The quick start's widths and loss weights, at single scale (DETR has no multi-scale form).
MODEL_FLAGS = ("--device cpu --backbone resnet18 --enc_layers 1 --dec_layers 3 --hidden_dim 64 --nheads 4 "
               "--dim_feedforward 128 --num_queries 20 --dropout 0 --cls_loss_coef 8 --batch_size 4 "
               "--num_workers 0 --eval_every_epoch 1 --save_every_epoch 0 --print_freq 100").split()
# DETR's ratio of backbone to transformer learning rate (1e-5 / 1e-4) for a backbone that already
# means something; one rate for both when the backbone starts from random weights.
PRETRAINED = ["--backbone_weights", str(BACKBONE), "--lr", "5e-4", "--lr_backbone", "5e-5"]
RANDOM = ["--no_pretrained_backbone", "--backbone_norm", "batch", "--lr", "5e-4", "--lr_backbone", "5e-4"]
BENCHMARK_SIZE = ["--scales", "224", "256", "--max_size", "320", "--val_size", "256"]
# 600 images of 4 per step: epochs of 150 steps, the rate dropped for the last one as the paper's
# 12-epoch schedule drops it for its last 2.
BENCHMARK_DATA = {"num_train": 600, "num_val": 100, "image_size": 256, "seed": 0}
BENCHMARK_SCHEDULE = ["--epochs", "4", "--lr_drop", "3"]


class Setting(NamedTuple):
    name: str
    title: str                # figure titles
    data: Dict                # make_synthetic_coco's arguments
    data_dir: Path            # where that data is made when missing
    flags: Sequence[str]      # every model's, less --seed
    backbone: Optional[Path]  # pre-trained weights the flags load (made when missing)


SETTINGS: Dict[str, Setting] = {s.name: s for s in [
    Setting("benchmark", "~256 px, pre-trained backbone", BENCHMARK_DATA, Path("data/shapes256"),
            MODEL_FLAGS + PRETRAINED + BENCHMARK_SIZE + BENCHMARK_SCHEDULE, BACKBONE),
    Setting("random_backbone", "~256 px, backbone from random weights", BENCHMARK_DATA, Path("data/shapes256"),
            MODEL_FLAGS + RANDOM + BENCHMARK_SIZE + BENCHMARK_SCHEDULE, None),
    Setting("quickstart", "the quick start's task (~128 px, random weights)",
            {"num_train": 1600, "num_val": 100, "image_size": 96, "seed": 0}, Path("data/shapes"),
            MODEL_FLAGS + RANDOM + ["--scales", "112", "128", "--max_size", "160", "--val_size", "128",
                                    "--epochs", "4", "--lr_drop", "3"], None),
]}

SAM_DETR = Model("sam_detr", "SAM-DETR", [])
NO_SAM = Model("no_sam", "no Semantics Aligner (`--no_sam`)", ["--no_sam"])
SETS: Dict[str, List[Model]] = {
    "comparison": [
        SAM_DETR,
        Model("sam_detr_smca", "SAM-DETR w/ SMCA", ["--smca"]),
        NO_SAM,
        Model("detr", "DETR (`--meta_arch detr`)", ["--meta_arch", "detr"]),
    ],
    "ablations": [
        SAM_DETR,
        Model("sam_search_image", "points searched over the whole image (`--sam_search image`)",
              ["--sam_search", "image"]),
        Model("no_sam_reweight", "no reweighting (`--no_sam_reweight`)", ["--no_sam_reweight"]),
        Model("sam_points_1", "one salient point (`--sam_points 1`)", ["--sam_points", "1"]),
        Model("sam_resample_avgpool", "RoI average pooling (`--sam_resample avgpool`)", ["--sam_resample", "avgpool"]),
        Model("sam_resample_maxpool", "RoI max pooling (`--sam_resample maxpool`)", ["--sam_resample", "maxpool"]),
        NO_SAM,
    ],
    "aligner": [SAM_DETR, NO_SAM],  # the pair that tells whether a setting lets the aligner act
}
FIGURE_STEM = {"comparison": "convergence", "ablations": "ablations", "aligner": "aligner"}


class Claim(NamedTuple):
    text: str
    paper: str        # what the paper reports (R50, COCO val2017)
    better: str       # the model the claim says wins
    worse: str


CLAIMS = [
    Claim("DETR is far behind at the same short budget", "DETR-R50 22.3 AP after 12 epochs, SAM-DETR-R50 33.1",
          "sam_detr", "detr"),
    Claim("the Semantics Aligner lifts the baseline", "SAM-DETR above its baseline without the aligner",
          "sam_detr", "no_sam"),
    Claim("SMCA adds to SAM-DETR", "36.0 against 33.1 AP (12 epochs)", "sam_detr_smca", "sam_detr"),
    Claim("salient points inside the box beat points over the image", "33.1 against 30.0 AP",
          "sam_detr", "sam_search_image"),
    Claim("one salient point per head beats one for all heads", "8 points above 1", "sam_detr", "sam_points_1"),
    Claim("reweighting helps", "33.1 against 32.0 AP", "sam_detr", "no_sam_reweight"),
    Claim("salient points beat RoI average pooling", "salient points above pooling", "sam_detr",
          "sam_resample_avgpool"),
    Claim("salient points beat RoI max pooling", "salient points above pooling", "sam_detr",
          "sam_resample_maxpool"),
]


def say(line: str) -> None:
    """One line in one write: runs trained on threads print without their lines running together."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train(model: Model, data: Path, run_dir: Path, threads: Optional[int] = None,
          common_flags: Sequence[str] = (), num_classes: int = NUM_CLASSES) -> float:
    """Trains one model in a fresh process (with `threads` CPU threads, default torch's) with
    `common_flags` and the model's own; returns its wall time in seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log.txt").unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "main.py"), "--coco_path", str(data), "--num_classes", str(num_classes),
           *common_flags, *model.flags, "--output_dir", str(run_dir)]
    say(f"[{run_dir.name}] {' '.join(cmd[1:])}")
    start = time.time()
    with (run_dir / "stdout.txt").open("w") as out:
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        done = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.time() - start
    if done.returncode:
        raise SystemExit(f"[{run_dir.name}] failed (exit {done.returncode}); see {run_dir / 'stdout.txt'}")
    (run_dir / "wall_seconds.txt").write_text(f"{seconds:.0f}\n")
    say(f"[{run_dir.name}] {seconds:.0f} s")
    return seconds


def epochs_of(flags: Sequence[str]) -> int:
    return int(flags[list(flags).index("--epochs") + 1])


def params_of(work: Path, model: Model, seeds: Sequence[int]) -> str:
    log = seeded_runs.read_log(run_dir(work, model, seeds[0]))
    return f"{log[-1]['n_parameters'] / 1e6:.2f} M"


VERDICT_MARK = {AGREES: "+", DISAGREES: "-", CANNOT_TELL: "?"}


def claims_table(work: Path, seeds: Sequence[int], models: Dict[str, Model]) -> str:
    """The paper's claims that the trained models can judge: both sides' last-epoch AP50 and AP
    (mean ± deviation over seeds) with the verdict of each, and the AP50 verdict after every epoch."""
    head = ["the paper's claim", "the paper (R50, COCO)", "AP50 here", "AP50", "AP here", "AP",
            "AP50 by epoch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for claim in CLAIMS:
        if claim.better not in models or claim.worse not in models:
            continue
        cells = [claim.text, claim.paper]
        for stat in ("AP50", "AP"):
            better, worse = (final(work, models[name], seeds, stat) for name in (claim.better, claim.worse))
            cells += [f"{seeded_runs.spread(better)} vs {seeded_runs.spread(worse)}", verdict(better, worse)]
        better, worse = (curves(work, models[name], seeds, "AP50") for name in (claim.better, claim.worse))
        cells.append(" ".join(VERDICT_MARK[verdict([c[e] for c in better], [c[e] for c in worse])]
                              for e in range(min(len(c) for c in better + worse))))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + ("\n\nA claim is judged on the last epoch: \"agrees\" when every seed of the model it "
                               "favours ends above every seed of the other, \"disagrees\" when every one ends "
                               "below, \"cannot tell\" when the seeds' ranges overlap. By epoch: + agrees, "
                               "- disagrees, ? cannot tell, after epoch 1, 2, ...\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", choices=sorted(SETS) + ["all"], default="comparison")
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="benchmark")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--data", type=Path, default=None, help="the setting's data (made if missing; "
                        "default: data/shapes256, or data/shapes for the quick start's)")
    parser.add_argument("--backbone_weights", type=Path, default=BACKBONE,
                        help="the pre-trained backbone (made by tools/pretrain_backbone.py if missing)")
    parser.add_argument("--work", type=Path, default=Path("output/convergence"), help="one folder per setting")
    parser.add_argument("--out", type=Path, default=Path("output/convergence"),
                        help="where the figures (.png) and tables (.md) go")
    parser.add_argument("--retrain", action="store_true", help="train even the runs that are complete")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, each with cores / jobs threads (small models use two "
                             "cores better as two one-thread runs; float rounding differs with the thread count)")
    return parser.parse_args(argv)


def prepare(setting: Setting, args: argparse.Namespace) -> List[str]:
    """Makes the data and the backbone when missing; returns the setting's flags."""
    data = args.data or setting.data_dir
    if not (data / "annotations").exists():
        make_synthetic_coco(out_dir=data, **setting.data)
    flags = list(setting.flags)
    if setting.backbone is not None:
        flags[flags.index(str(setting.backbone))] = str(args.backbone_weights)
        if not args.backbone_weights.exists():
            import pretrain_backbone
            pretrain_backbone.main(["--out", str(args.backbone_weights)])
    return flags


def main(argv=None) -> Dict[str, str]:
    args = parse_args(argv)
    setting = SETTINGS[args.setting]
    data = args.data or setting.data_dir
    flags = prepare(setting, args)
    epochs = epochs_of(flags)
    work = args.work / setting.name
    args.out.mkdir(parents=True, exist_ok=True)
    names = [n for n in SETS if n != "aligner"] if args.set == "all" else [args.set]  # the comparison first
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    prefix = "" if setting.name == "benchmark" else f"{setting.name}_"
    written, trained = {}, set()
    for name in names:
        # each set trains what no earlier set trained (the ablations share two models)
        todo = [(m, s) for m in SETS[name] for s in args.seeds if (m.name, s) not in trained
                and (args.retrain or epochs_done(work, m, s) < epochs)]
        start = time.time()
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(lambda ms: train(ms[0], data, run_dir(work, *ms), threads,
                                           common_flags=flags + ["--seed", str(ms[1])]), todo))
        trained.update((m.name, s) for m, s in todo)
        if todo:
            print(f"{name}: trained {len(todo)} runs in {(time.time() - start) / 60:.1f} minutes "
                  f"({args.jobs} at a time)", flush=True)
        stem = prefix + FIGURE_STEM[name]
        seeded_runs.figure(work, SETS[name], args.seeds, args.out / f"{stem}.png",
                           f"{name}, {setting.title}: mean and min-max of {len(args.seeds)} seeds")
        text = seeded_runs.table(work, SETS[name], args.seeds, epochs, extra_head=["flags", "params"],
                                 extra=lambda m: [f"`{' '.join(m.flags) or '(none)'}`",
                                                  params_of(work, m, args.seeds)])
        (args.out / f"{stem}.md").write_text(text)
        print(text)
        written[name] = text
    models = {m.name: m for n in names for m in SETS[n]}
    if len(names) > 1:
        written["claims"] = claims_table(work, args.seeds, models)
        (args.out / f"{prefix}claims.md").write_text(written["claims"])
        print(written["claims"])
    return written


if __name__ == "__main__":
    main()
