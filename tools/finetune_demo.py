"""Fine-tuning shown on the CPU: a detector trained on one generated task, fine-tuned on a second
task with other classes (one shared), against the same model trained from scratch on the second
task with the same budget, over several seeds:

    python tools/finetune_demo.py --out docs

The source detector is the quick start's (`output/shapes/checkpoint.pth`: circles, squares and
triangles; trained here with the README's command when missing). The second task draws rings,
crosses and squares (tools/make_synthetic_coco.py --classes ring cross square) on fewer images:
"square" is shared (the checkpoint's id 2 is the new id 3, its trained rows are kept), rings and
crosses are new. Both arms run the quick start's command on the second task, the fine-tuned one
with `--finetune`. Finished runs are read, not trained again (--retrain trains them anyway).
Writes finetune.png (AP50 and AP per epoch, mean and min-max band over the seeds) and finetune.md.
"""
import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import seeded_runs  # noqa: E402
from convergence import train  # noqa: E402
from datasets.synthetic import make_synthetic_coco  # noqa: E402
from seeded_runs import Model, epochs_done, run_dir  # noqa: E402

SOURCE_DATA = {"num_train": 1600, "num_val": 100, "image_size": 96, "seed": 0}  # the quick start's
SECOND_CLASSES = ("ring", "cross", "square")
SECOND_DATA = {"num_train": 400, "num_val": 100, "image_size": 96, "seed": 1, "classes": SECOND_CLASSES}
NUM_CLASSES = len(SECOND_CLASSES) + 1  # ids 1..3, as the quick start's --num_classes 4
SEEDS = (42, 43, 44)

# The quick start's model and settings (README), on the second task: 100 steps an epoch
MODEL_FLAGS = ("--device cpu --backbone resnet18 --no_pretrained_backbone --backbone_norm batch --smca --multiscale "
               "--enc_layers 1 --dec_layers 3 --hidden_dim 64 --nheads 4 --dim_feedforward 128 --num_queries 20 "
               "--scales 80 96 --max_size 128 --val_size 96").split()
SOURCE_FLAGS = MODEL_FLAGS + ("--dropout 0 --cls_loss_coef 8 --lr 5e-4 --lr_backbone 5e-4 --epochs 3 --lr_drop 2 "
                              "--batch_size 4 --num_workers 1 --eval_every_epoch 1 --save_every_epoch 0 "
                              "--print_freq 50").split()
EPOCHS = 4
SECOND_FLAGS = MODEL_FLAGS + (f"--dropout 0 --cls_loss_coef 8 --lr 5e-4 --lr_backbone 5e-4 --epochs {EPOCHS} "
                              f"--lr_drop {EPOCHS - 1} --batch_size 4 --num_workers 0 --eval_every_epoch 1 "
                              f"--save_every_epoch 0 --print_freq 100").split()


def arms(source: Path) -> List[Model]:
    return [Model("finetuned", "fine-tuned from the quick start's detector", ["--finetune", str(source)]),
            Model("scratch", "from scratch (the same command without --finetune)", [])]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("output/shapes/checkpoint.pth"),
                        help="the detector to fine-tune (trained with the quick start's command when missing)")
    parser.add_argument("--source_data", type=Path, default=Path("data/shapes"))
    parser.add_argument("--data", type=Path, default=Path("data/shapes2"), help="the second task (made if missing)")
    parser.add_argument("--work", type=Path, default=Path("output/finetune"), help="one run folder per arm and seed")
    parser.add_argument("--out", type=Path, default=Path("output/finetune"), help="where finetune.png/.md go")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, each with cores / jobs threads")
    return parser.parse_args(argv)


def main(argv=None) -> Dict[str, str]:
    args = parse_args(argv)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    if not args.source.exists():
        if not (args.source_data / "annotations").exists():
            make_synthetic_coco(out_dir=args.source_data, **SOURCE_DATA)
        train(Model("source", "the quick start", []), args.source_data, args.source.parent,
              common_flags=SOURCE_FLAGS, num_classes=NUM_CLASSES)
    if not (args.data / "annotations").exists():
        make_synthetic_coco(out_dir=args.data, **SECOND_DATA)
    models = arms(args.source)
    todo = [(m, s) for m in models for s in SEEDS
            if args.retrain or epochs_done(args.work, m, s) < EPOCHS]
    start = time.time()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda ms: train(ms[0], args.data, run_dir(args.work, *ms), threads,
                                       common_flags=SECOND_FLAGS + ["--seed", str(ms[1])],
                                       num_classes=NUM_CLASSES), todo))
    if todo:
        print(f"trained {len(todo)} runs in {(time.time() - start) / 60:.1f} minutes ({args.jobs} at a time)")
    args.out.mkdir(parents=True, exist_ok=True)
    seeded_runs.figure(args.work, models, SEEDS, args.out / "finetune.png",
                       f"Second task (rings, crosses, squares; {SECOND_DATA['num_train']} images): mean and "
                       f"min-max of {len(SEEDS)} seeds")
    text = seeded_runs.table(args.work, models, SEEDS, EPOCHS)
    (args.out / "finetune.md").write_text(text)
    print(text)
    return {"table": text}


if __name__ == "__main__":
    main()
