"""COCO box evaluation that can be fed batch by batch and merged across processes.

Each ``update`` runs pycocotools' per-image matching on the images of one batch and keeps
the per-image results (a (categories, area ranges, images) grid). ``synchronize_between_
processes`` gathers those grids from all ranks, keeps every image once (sorted by id) and
hands them to pycocotools, so ``accumulate`` / ``summarize`` give the same numbers as a single
``COCOeval`` run over all images at once. ``per_class_ap`` reads the AP of each category from the
accumulated arrays and ``per_class_table`` prints them compactly.
"""
import contextlib
import copy
import io
import math
import warnings
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util.misc import all_gather

SUPPORTED_IOU_TYPES = ("bbox",)
NUM_BBOX_STATS = 12  # AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl
MISSING_STAT = -1.0  # pycocotools' value for "nothing to evaluate"
AP50_IOU = 0.5  # the IoU threshold of AP50
ALL_AREAS = "all"  # pycocotools' label of the area range that takes every object
NO_AP = "-"  # the table's AP of a category without objects
TABLE_COLUMNS = 3  # categories per line: COCO's 80 take 27 lines of about 110 characters
NAME_WIDTH = 14  # COCO's longest name, "baseball glove"; longer names are cut
COLUMN_SEPARATOR = " | "
AP_WIDTH = len("100.0")  # an AP in percent, one decimal


def _quiet():
    """Swallows pycocotools' progress prints (they would appear once per batch)."""
    return contextlib.redirect_stdout(io.StringIO())


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) corners -> (N, 4) COCO [x, y, width, height]."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], dim=-1)


def predictions_to_coco(predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> List[Dict]:
    """{image_id: {'scores' (N,), 'labels' (N,), 'boxes' (N, 4) xyxy pixels}} -> COCO result list."""
    results = []
    for image_id, prediction in predictions.items():
        boxes = torch.as_tensor(prediction["boxes"]).reshape(-1, 4)
        if boxes.shape[0] == 0:
            continue
        boxes = xyxy_to_xywh(boxes.float()).tolist()
        scores = torch.as_tensor(prediction["scores"]).tolist()
        labels = torch.as_tensor(prediction["labels"]).tolist()
        results.extend({"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": score}
                       for box, score, label in zip(boxes, scores, labels))
    return results


def _results_api(coco_gt: COCO, results: List[Dict]) -> COCO:
    """Detections as a COCO object; pycocotools' loadRes cannot take an empty list."""
    with _quiet():
        if results:
            return coco_gt.loadRes(results)
        empty = COCO()
        empty.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                         "categories": copy.deepcopy(coco_gt.dataset.get("categories", []))}
        empty.createIndex()
        return empty


def _grid_shape(coco_eval: COCOeval) -> Tuple[int, int]:
    """(categories, area ranges) of the per-image result grid."""
    params = coco_eval.params
    num_categories = len(params.catIds) if params.useCats else 1
    return num_categories, len(params.areaRng)


def _per_image_grid(coco_eval: COCOeval) -> np.ndarray:
    """pycocotools' flat evalImgs (category-major, then area, then image) -> (K, A, I) object array."""
    flat = np.empty(len(coco_eval.evalImgs), dtype=object)
    for index, result in enumerate(coco_eval.evalImgs):
        flat[index] = result  # item by item: numpy must not try to unpack the dicts
    return flat.reshape(*_grid_shape(coco_eval), len(coco_eval.params.imgIds))


def merge_per_image_results(gathered: Iterable[Tuple[List[int], np.ndarray]]) -> Tuple[List[int], np.ndarray]:
    """Joins (image ids, (K, A, I) grid) pairs from all ranks; each image kept once, ids sorted.

    Duplicates appear when a distributed sampler pads the last batch with repeated images.
    """
    pairs = list(gathered)
    image_ids = np.array([i for ids, _ in pairs for i in ids], dtype=np.int64)
    grid = np.concatenate([g for _, g in pairs], axis=2)
    unique_ids, first_index = np.unique(image_ids, return_index=True)
    return [int(i) for i in unique_ids], grid[..., first_index]


class CocoEvaluator:
    """Batch-wise, multi-process COCO evaluation (boxes only).

    coco_gt: pycocotools COCO with the ground truth (deep-copied: pycocotools writes into it);
    iou_types: only ('bbox',). After accumulate(), ``coco_eval['bbox'].stats`` holds the 12
    standard numbers and ``coco_eval['bbox'].eval`` the precision/recall arrays.
    """

    def __init__(self, coco_gt: COCO, iou_types: Sequence[str] = ("bbox",)):
        if isinstance(iou_types, str):
            iou_types = (iou_types,)
        unsupported = [t for t in iou_types if t not in SUPPORTED_IOU_TYPES]
        if unsupported:
            raise ValueError(f"iou type(s) {unsupported} not supported; use {SUPPORTED_IOU_TYPES}")
        self.coco_gt = copy.deepcopy(coco_gt)
        self.iou_types = tuple(iou_types)
        self.coco_eval = {t: COCOeval(self.coco_gt, iouType=t) for t in self.iou_types}
        self.img_ids: List[int] = []
        self.eval_imgs: Dict[str, List[np.ndarray]] = {t: [] for t in self.iou_types}
        self._synchronized = False

    def update(self, predictions: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        """Evaluates one batch: {image_id: {'scores', 'labels', 'boxes' (xyxy pixels)}}.

        An image present with zero boxes counts (its objects are missed); an empty dict is a
        no-op.
        """
        image_ids = sorted({int(i) for i in predictions})
        if not image_ids:
            return
        unknown = [i for i in image_ids if i not in self.coco_gt.imgs]
        if unknown:
            raise ValueError(f"predictions for image id(s) {unknown} that are not in the ground truth")
        self.img_ids.extend(image_ids)
        results = predictions_to_coco(predictions)
        for iou_type, coco_eval in self.coco_eval.items():
            coco_eval.cocoDt = _results_api(self.coco_gt, copy.deepcopy(results))
            coco_eval.params.imgIds = image_ids
            with _quiet():
                coco_eval.evaluate()
            self.eval_imgs[iou_type].append(_per_image_grid(coco_eval))
        self._synchronized = False

    def _local_results(self, iou_type: str) -> Tuple[List[int], np.ndarray]:
        grids = self.eval_imgs[iou_type]
        if grids:
            return list(self.img_ids), np.concatenate(grids, axis=2)
        return [], np.empty((*_grid_shape(self.coco_eval[iou_type]), 0), dtype=object)

    def synchronize_between_processes(self) -> None:
        """Gathers the per-image results of every rank (collective: all ranks must call it)."""
        for iou_type, coco_eval in self.coco_eval.items():
            image_ids, grid = merge_per_image_results(all_gather(self._local_results(iou_type)))
            coco_eval.evalImgs = list(grid.flatten())
            coco_eval.params.imgIds = image_ids
            # accumulate() reads the parameters the per-image results were computed with.
            coco_eval._paramsEval = copy.deepcopy(coco_eval.params)
        self._synchronized = True

    def accumulate(self) -> None:
        """Precision/recall tables over all gathered images (prints pycocotools' timing line)."""
        if not self._synchronized:
            raise RuntimeError("call synchronize_between_processes() before accumulate()")
        for iou_type, coco_eval in self.coco_eval.items():
            if not coco_eval.params.imgIds:
                warnings.warn(f"CocoEvaluator ({iou_type}): no image was evaluated; stats are {MISSING_STAT}")
                coco_eval.eval = {}
                coco_eval.stats = np.full(NUM_BBOX_STATS, MISSING_STAT)
                continue
            coco_eval.accumulate()

    def summarize(self) -> None:
        """Prints the standard COCO table per iou type and fills ``coco_eval[t].stats``."""
        for iou_type, coco_eval in self.coco_eval.items():
            print(f"IoU metric: {iou_type}")
            if not coco_eval.eval:
                print("  no image was evaluated")
                continue
            coco_eval.summarize()


# --------------------------------------------------------------------------------------------
# AP per category
# --------------------------------------------------------------------------------------------
PerClass = Dict[int, Dict[str, Any]]  # {category id: {'name', 'objects', 'AP', 'AP50'}}


def object_counts(coco_gt: COCO, image_ids: Iterable[int]) -> Dict[int, int]:
    """{category id: its non-crowd annotations in the images `image_ids`}: the objects that AP
    measures (pycocotools ignores crowd regions), every category of `coco_gt` included."""
    counts = {int(cat_id): 0 for cat_id in coco_gt.cats}
    for image_id in image_ids:
        for ann in coco_gt.imgToAnns.get(image_id, []):
            if not ann.get("iscrowd", 0):
                counts[ann["category_id"]] = counts.get(ann["category_id"], 0) + 1
    return counts


def _mean_filled(precision: np.ndarray) -> Optional[float]:
    """Mean of the entries pycocotools filled (> -1), as its summarize() takes it; None where none
    is (a category without objects has no AP)."""
    filled = precision[precision > MISSING_STAT]
    return float(filled.mean()) if filled.size else None


def per_class_ap(coco_eval: COCOeval) -> PerClass:
    """AP and AP50 of every category of an accumulated COCOeval: summarize()'s first two numbers,
    one category at a time.

    Reads eval['precision'], shaped (T IoU thresholds, R recall points, K categories, A area
    ranges, M maxDets), at area 'all' and the largest maxDets (100), as COCO's AP does. Returns
    {category id: {'name': str, 'objects': int (non-crowd, in the evaluated images), 'AP': float in
    [0, 1] or None, 'AP50': same}}: None for a category without objects; {} when nothing was
    accumulated or categories were pooled (params.useCats = 0). Plain Python values (JSON, torch.save).
    """
    if not coco_eval.eval or not coco_eval.eval["params"].useCats:
        return {}
    params = coco_eval.eval["params"]  # the parameters the arrays were accumulated with
    # (T, R, K) at area 'all' and the last maxDets, the largest (pycocotools' AP takes maxDets[2] of [1, 10, 100])
    precision = coco_eval.eval["precision"][:, :, :, params.areaRngLbl.index(ALL_AREAS), -1]
    at_50 = np.flatnonzero(np.isclose(params.iouThrs, AP50_IOU))
    counts = object_counts(coco_eval.cocoGt, params.imgIds)
    cats = coco_eval.cocoGt.cats
    return {int(cat_id): {"name": str(cats.get(cat_id, {}).get("name", cat_id)), "objects": counts.get(cat_id, 0),
                          "AP": _mean_filled(precision[:, :, k]),
                          "AP50": _mean_filled(precision[at_50, :, k]) if at_50.size else None}
            for k, cat_id in enumerate(params.catIds)}


def _percent(value: Optional[float]) -> str:
    return NO_AP if value is None else f"{100 * value:.1f}"


def per_class_table(per_class: PerClass, columns: int = TABLE_COLUMNS) -> str:
    """per_class_ap's rows as text: a title, a header and `columns` categories per line, read down
    then across in category id order, each `name  objects  AP  AP50` (AP in %, '-' for a category
    without objects). COCO's 80 categories take 2 + 27 lines. "" for no rows (nothing evaluated)."""
    if not per_class:
        return ""
    count_width = max(len("objects"), *(len(str(row["objects"])) for row in per_class.values()))
    cell = f"{{:<{NAME_WIDTH}}} {{:>{count_width}}} {{:>{AP_WIDTH}}} {{:>{AP_WIDTH}}}"
    cells = [cell.format(row["name"][:NAME_WIDTH], row["objects"], _percent(row["AP"]), _percent(row["AP50"]))
             for _, row in sorted(per_class.items())]
    height = math.ceil(len(cells) / columns)
    header = COLUMN_SEPARATOR.join([cell.format("category", "objects", "AP", "AP50")] * math.ceil(len(cells) / height))
    rows = [COLUMN_SEPARATOR.join(cells[line::height]).rstrip() for line in range(height)]
    title = (f"AP per category (bbox, %: AP at IoU=0.50:0.95, AP50 at IoU=0.50, area=all, maxDets=100; "
             f"{NO_AP}: no objects):")
    return "\n".join([title, header.rstrip(), *rows])
