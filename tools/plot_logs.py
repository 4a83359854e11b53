"""Plot training curves of one or more runs from their log.txt files.

Example:
    python tools/plot_logs.py output/run_a output/run_b --out curves.png
    python tools/plot_logs.py output/run_a --out ap.png --fields AP AP50 AP75 loss
    python tools/plot_logs.py output/run_a --out classes.png --classes person car 3

Every RUN_DIR must hold the log.txt that main.py writes: one JSON object per line (official keys
train_loss, train_loss_ce, ..., test_loss, ..., test_coco_eval_bbox, epoch, n_parameters). SAM-DETR
and DETR (--meta_arch detr) runs log the same keys, so their curves overlay; their loss_ce differ
in kind (SAM-DETR's sigmoid focal loss, DETR's softmax cross-entropy).

A field is one subplot over epochs, every run in its own colour (legend: the run folder names):

* a COCO stat (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl), read from
  test_coco_eval_bbox and shown in percent;
* a name X with train_X and/or test_X in the logs (loss, loss_ce, class_error, ...): train
  solid, test dashed;
* any other key of the logs exactly as written (e.g. train_lr);
* class:C, the AP (solid) and AP50 (dashed) of one category C, given by its id or its name (spaces
  may be written as underscores: traffic_light), read from test_per_class and shown in percent.
  --classes C1 C2 ... adds one such subplot per category (and, without --fields, plots only those).

Lines missing a field (e.g. epochs without evaluation, or logs written before test_per_class) are
skipped for that field.
"""
import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only; no display needed (clusters, CI)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

LOG_NAME = "log.txt"
DEFAULT_FIELDS = ("loss", "loss_ce", "loss_bbox", "loss_giou", "AP", "AP50")
COCO_KEY = "test_coco_eval_bbox"
# The order of pycocotools' COCOeval.stats.
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
SPLIT_STYLES = (("train", "-"), ("test", "--"))
PER_CLASS_KEY = "test_per_class"  # {category id: {'name', 'objects', 'AP', 'AP50'}}
CLASS_PREFIX = "class:"  # a field naming one category
CLASS_STYLES = (("AP", "-"), ("AP50", "--"))
MAX_COLUMNS = 3
PANEL_SIZE = (5.0, 3.6)  # inches per subplot
DPI = 100

Log = List[dict]
Series = Tuple[List[float], List[float]]  # epochs, values


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def read_log(run_dir: Path) -> Log:
    """The JSON objects of run_dir/log.txt, in file order; errors name the file (and line)."""
    path = Path(run_dir) / LOG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {run_dir} a run directory of main.py?)")
    entries = []
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) carry nothing
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: malformed line, not JSON ({error.msg}): "
                                 f"{line.strip()[:80]!r}") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object per line, got {type(entry).__name__}")
            entries.append(entry)
    if not entries:
        raise ValueError(f"{path}: empty log (no epoch has been logged yet)")
    return entries


def run_names(run_dirs: Sequence[Path]) -> List[str]:
    """Folder names as labels; the paths as given when two runs share a folder name."""
    names = [Path(d).resolve().name or str(d) for d in run_dirs]
    if len(set(names)) < len(names):
        return [str(d) for d in run_dirs]
    return names


# --------------------------------------------------------------------------------------------
# Fields
# --------------------------------------------------------------------------------------------
def _epoch(entry: dict, index: int) -> float:
    """The logged epoch; the line's position for logs without one."""
    return float(entry.get("epoch", index))


def _values(log: Log, key: str, stat: Optional[int] = None) -> Series:
    """(epochs, values) of the entries that have ``key`` (element ``stat`` of a list value)."""
    epochs, values = [], []
    for index, entry in enumerate(log):
        value = entry.get(key)
        if stat is not None:
            value = value[stat] if isinstance(value, list) and len(value) > stat else None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            epochs.append(_epoch(entry, index))
            values.append(float(value))
    return epochs, values


def class_field(category: str) -> str:
    """The field of one category's AP curves (--classes C is --fields class:C)."""
    return f"{CLASS_PREFIX}{category}"


def _class_row(entry: dict, category: str) -> Optional[Tuple[str, dict]]:
    """(id, test_per_class row) of ``category`` (an id or a name) in one log line; None if absent."""
    per_class = entry.get(PER_CLASS_KEY)
    if not isinstance(per_class, dict):
        return None  # lines logged before the per-class AP, or without evaluation
    if isinstance(per_class.get(category), dict):
        return category, per_class[category]
    return next(((k, row) for k, row in per_class.items()
                 if isinstance(row, dict) and category in (row.get("name"), str(row.get("name")).replace(" ", "_"))),
                None)


def class_series(log: Log, category: str) -> Dict[str, Series]:
    """One category's curves in percent: {'AP': ..., 'AP50': ...}; epochs where it has no AP (no
    objects, no per-class AP logged) are skipped; {} if it has none anywhere."""
    series = {}
    for stat, _ in CLASS_STYLES:
        epochs, values = [], []
        for index, entry in enumerate(log):
            value = (_class_row(entry, category) or ("", {}))[1].get(stat)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                epochs.append(_epoch(entry, index))
                values.append(100 * float(value))
        if values:
            series[stat] = (epochs, values)
    return series


def logged_classes(logs: Dict[str, Log]) -> List[str]:
    """'id name' of every category in the logs' test_per_class, for error messages."""
    named = {}
    for log in logs.values():
        for entry in log:
            per_class = entry.get(PER_CLASS_KEY)
            if isinstance(per_class, dict):
                named.update({str(k): row.get("name") for k, row in per_class.items() if isinstance(row, dict)})
    # JSON keys are strings: shorter first puts the ids in numeric order
    return [f"{k} {name}" for k, name in sorted(named.items(), key=lambda item: (len(item[0]), item[0]))]


def field_series(log: Log, field: str) -> Dict[str, Series]:
    """The curves of ``field`` in one log: {'train': ..., 'test': ...}, {'AP': ..., 'AP50': ...} (a
    class:C field), {'': ...} or {} if absent."""
    if field.startswith(CLASS_PREFIX):
        return class_series(log, field[len(CLASS_PREFIX):])
    if field in COCO_STATS:
        epochs, values = _values(log, COCO_KEY, COCO_STATS.index(field))
        return {"": (epochs, [100 * v for v in values])} if values else {}
    split = {name: _values(log, f"{name}_{field}") for name, _ in SPLIT_STYLES}
    split = {name: series for name, series in split.items() if series[1]}
    if split:
        return split
    exact = _values(log, field)
    return {"": exact} if exact[1] else {}


def check_fields(fields: Sequence[str], logs: Dict[str, Log]) -> None:
    """Every field must be found in at least one log; the error lists the keys there are."""
    for field in fields:
        if field.startswith(CLASS_PREFIX) and not any(field_series(log, field) for log in logs.values()):
            raise SystemExit(_missing_class(field[len(CLASS_PREFIX):], logs))
        if not any(field_series(log, field) for log in logs.values()):
            keys = sorted({k for log in logs.values() for entry in log for k in entry})
            raise SystemExit(f"--fields {field}: in none of the logs ({', '.join(logs)}). "
                             f"Use a COCO stat ({', '.join(COCO_STATS)}), a name X with train_X/test_X, "
                             f"or one of the keys: {', '.join(keys)}")


def _missing_class(category: str, logs: Dict[str, Log]) -> str:
    """Why ``category`` has no curve: no objects where it was evaluated, not a logged category, or
    logs without per-class AP."""
    where = f"--classes {category}: no AP of this category in the logs ({', '.join(logs)})"
    if any(_class_row(entry, category) for log in logs.values() for entry in log):
        return f"{where}: it has no objects in the evaluated images"
    classes = logged_classes(logs)
    if classes:
        return f"{where}. Their categories (id name): {', '.join(classes)}"
    return f"{where}. They have no per-class AP ({PER_CLASS_KEY}): logged before it was added?"


def _ylabel(field: str) -> str:
    if field.startswith(CLASS_PREFIX):
        return "AP, AP50 (%)"
    return f"{field} (%)" if field in COCO_STATS else field


def _class_title(category: str, logs: Dict[str, Log]) -> str:
    """'name (id N)' of a category as the logs have it; as given if they have none."""
    found = next((row for log in logs.values() for entry in log for row in [_class_row(entry, category)] if row),
                 None)
    shown = f"{found[1].get('name')} (id {found[0]})" if found else category
    return f"{shown}: AP (solid), AP50 (dashed)"


def _title(field: str, logs: Dict[str, Log]) -> str:
    if field.startswith(CLASS_PREFIX):
        return _class_title(field[len(CLASS_PREFIX):], logs)
    if field in COCO_STATS:
        return f"{field} (COCO bbox, val)"
    # loss_ce: SAM-DETR's focal loss or DETR's cross-entropy, which the log does not say
    return {"loss": "total loss (weighted sum)", "loss_ce": "classification loss",
            "loss_bbox": "box L1 loss", "loss_giou": "box GIoU loss"}.get(field, field)


# --------------------------------------------------------------------------------------------
# Plotting
# --------------------------------------------------------------------------------------------
def plot_logs(logs: Dict[str, Log], fields: Sequence[str], out: Path) -> Path:
    """A grid with one subplot per field, all runs overlaid; saved as ``out`` (PNG, ...)."""
    columns = min(MAX_COLUMNS, len(fields))
    rows = math.ceil(len(fields) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows),
                             squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, field in zip(axes.flat, fields):
        for index, (name, log) in enumerate(logs.items()):
            _plot_run(ax, field_series(log, field), name, colours[index % len(colours)])
        ax.set_title(_title(field, logs))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_ylabel(_ylabel(field))
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    for ax in axes.flat[len(fields):]:
        ax.set_visible(False)  # unused cells of the last row
    fig.suptitle("Training curves: " + ", ".join(logs))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def _plot_run(ax, series: Dict[str, Series], name: str, colour: str) -> None:
    """One run's curves of one field: train solid, test dashed, a class's AP solid and AP50 dashed,
    others solid."""
    styles = {**dict(SPLIT_STYLES), **dict(CLASS_STYLES)}
    for split, (epochs, values) in series.items():
        label = f"{name} ({split})" if split else name
        # markers keep single-epoch logs visible (a line needs two points)
        ax.plot(epochs, values, linestyle=styles.get(split, "-"), color=colour, marker=".", label=label)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="folders holding log.txt")
    parser.add_argument("--out", type=Path, required=True, help="image to write, e.g. curves.png")
    parser.add_argument("--fields", nargs="+", default=None,
                        help=f"subplots, default: {' '.join(DEFAULT_FIELDS)} (none with --classes)")
    parser.add_argument("--classes", nargs="+", default=[], metavar="CATEGORY",
                        help="categories (ids or names, e.g. person car 3) whose AP and AP50 per epoch get a "
                             "subplot each, from test_per_class; after the --fields subplots")
    args = parser.parse_args(argv)
    if args.fields is None:
        args.fields = [] if args.classes else list(DEFAULT_FIELDS)
    args.fields = args.fields + [class_field(c) for c in args.classes]
    return args


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    logs = dict(zip(run_names(args.run_dirs), (read_log(d) for d in args.run_dirs)))
    check_fields(args.fields, logs)
    out = plot_logs(logs, args.fields, args.out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
