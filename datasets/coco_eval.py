"""COCO box evaluation that can be fed batch by batch and merged across processes.

Each ``update`` runs pycocotools' per-image matching on the images of one batch and keeps
the per-image results (a (categories, area ranges, images) grid). ``synchronize_between_
processes`` gathers those grids from all ranks, keeps every image once (sorted by id) and
hands them to pycocotools, so ``accumulate`` / ``summarize`` give the same numbers as a single
``COCOeval`` run over all images at once.
"""
import contextlib
import copy
import io
import warnings
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util.misc import all_gather

SUPPORTED_IOU_TYPES = ("bbox",)
NUM_BBOX_STATS = 12  # AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl
MISSING_STAT = -1.0  # pycocotools' value for "nothing to evaluate"


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
