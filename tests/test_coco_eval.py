"""CocoEvaluator must reproduce a plain single-process pycocotools COCOeval exactly."""
import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import datasets.coco_eval as coco_eval_module
from datasets.coco_eval import CocoEvaluator, xyxy_to_xywh

NUM_IMAGES = 24
IMAGE_W, IMAGE_H = 640, 480
NUM_CATEGORIES = 3
MAX_OBJECTS = 6
MIN_SIDE, MAX_SIDE = 8, 300  # spans COCO's small / medium / large ranges
BOX_NOISE = 0.15  # relative jitter of predicted boxes
WRONG_LABEL_PROB = 0.15
MISS_PROB = 0.2
MAX_FALSE_POSITIVES = 3
IMAGES_WITHOUT_PREDICTIONS = (3, 10)
BATCH = 5


def quiet_coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def random_box(rng: np.random.Generator) -> list:
    w, h = rng.uniform(MIN_SIDE, MAX_SIDE, 2)
    return [float(rng.uniform(0, IMAGE_W - w)), float(rng.uniform(0, IMAGE_H - h)), float(w), float(h)]


@pytest.fixture(scope="module")
def ground_truth() -> COCO:
    rng = np.random.default_rng(0)
    images = [{"id": i, "file_name": f"{i}.jpg", "width": IMAGE_W, "height": IMAGE_H}
              for i in range(1, NUM_IMAGES + 1)]
    annotations = []
    for image in images:
        for _ in range(int(rng.integers(0, MAX_OBJECTS + 1))):  # some images have no objects
            box = random_box(rng)
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "bbox": box,
                                "category_id": int(rng.integers(1, NUM_CATEGORIES + 1)),
                                "area": box[2] * box[3], "iscrowd": int(rng.uniform() < 0.05)})
    categories = [{"id": c, "name": str(c), "supercategory": "x"} for c in range(1, NUM_CATEGORIES + 1)]
    return quiet_coco({"images": images, "annotations": annotations, "categories": categories})


def noisy_predictions(coco_gt: COCO, seed: int = 1) -> dict:
    """{image_id: {'scores', 'labels', 'boxes' xyxy}} with jitter, misses, label errors, false positives."""
    rng = np.random.default_rng(seed)
    predictions = {}
    for image_id in sorted(coco_gt.imgs):
        boxes, labels = [], []
        for ann in coco_gt.imgToAnns[image_id]:
            if rng.uniform() < MISS_PROB:
                continue
            x, y, w, h = ann["bbox"]
            jitter = rng.normal(0, BOX_NOISE, 4) * [w, h, w, h]
            boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
            wrong = rng.uniform() < WRONG_LABEL_PROB
            labels.append(int(rng.integers(1, NUM_CATEGORIES + 1)) if wrong else ann["category_id"])
        for _ in range(int(rng.integers(0, MAX_FALSE_POSITIVES + 1))):
            x, y, w, h = random_box(rng)
            boxes.append([x, y, x + w, y + h])
            labels.append(int(rng.integers(1, NUM_CATEGORIES + 1)))
        if image_id in IMAGES_WITHOUT_PREDICTIONS:
            boxes, labels = [], []
        predictions[image_id] = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                 "scores": torch.tensor(rng.uniform(0.05, 1.0, len(boxes)), dtype=torch.float32),
                                 "labels": torch.tensor(labels, dtype=torch.int64)}
    return predictions


def plain_cocoeval(coco_gt: COCO, predictions: dict) -> COCOeval:
    """The reference: one COCOeval over every image, as a user would run it by hand."""
    gt = copy.deepcopy(coco_gt)
    results = []
    for image_id, pred in predictions.items():
        for box, score, label in zip(xyxy_to_xywh(pred["boxes"]).tolist(), pred["scores"].tolist(),
                                     pred["labels"].tolist()):
            results.append({"image_id": image_id, "category_id": label, "bbox": box, "score": score})
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCOeval(gt, gt.loadRes(results), "bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    return reference


def batches(predictions: dict, image_ids) -> list:
    image_ids = list(image_ids)
    return [{i: predictions[i] for i in image_ids[k:k + BATCH]} for k in range(0, len(image_ids), BATCH)]


def finish(evaluator: CocoEvaluator) -> COCOeval:
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.coco_eval["bbox"]


def assert_same(result: COCOeval, reference: COCOeval) -> None:
    assert np.array_equal(np.asarray(result.stats), np.asarray(reference.stats))
    for key in ("precision", "recall", "scores"):
        assert np.array_equal(result.eval[key], reference.eval[key])


def test_single_process_equals_plain_cocoeval(ground_truth, capsys):
    predictions = noisy_predictions(ground_truth)
    reference = plain_cocoeval(ground_truth, predictions)
    assert 0.1 < reference.stats[0] < 0.9  # the noise makes a non-trivial case
    evaluator = CocoEvaluator(ground_truth, ("bbox",))
    # a shuffled order, as a sampler would give
    order = np.random.default_rng(2).permutation(sorted(predictions)).tolist()
    for batch in batches(predictions, order):
        evaluator.update(batch)
    evaluator.update({})  # an empty batch is harmless
    assert capsys.readouterr().out == ""  # pycocotools stays quiet during updates
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in capsys.readouterr().out
    assert_same(evaluator.coco_eval["bbox"], reference)
    assert len(evaluator.coco_eval["bbox"].stats.tolist()) == 12


def test_two_ranks_equal_plain_cocoeval(ground_truth, monkeypatch):
    predictions = noisy_predictions(ground_truth)
    reference = plain_cocoeval(ground_truth, predictions)
    image_ids = sorted(predictions)
    # A distributed sampler interleaves images and pads the last rank with repeated images.
    rank_ids = [image_ids[0::2], image_ids[1::2] + image_ids[:2]]
    evaluators = [CocoEvaluator(ground_truth) for _ in rank_ids]
    for evaluator, ids in zip(evaluators, rank_ids):
        for batch in batches(predictions, ids):
            evaluator.update(batch)

    sent = {}

    def gather_rank1(data):  # rank 1 only records what it sends
        sent["rank1"] = data
        return [data]

    monkeypatch.setattr(coco_eval_module, "all_gather", gather_rank1)
    evaluators[1].synchronize_between_processes()
    monkeypatch.setattr(coco_eval_module, "all_gather", lambda data: [data, sent["rank1"]])
    evaluators[0].synchronize_between_processes()
    assert evaluators[0].coco_eval["bbox"].params.imgIds == image_ids
    assert_same(finish(evaluators[0]), reference)


def test_images_without_any_prediction_score_zero(ground_truth):
    predictions = {i: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
                   for i in ground_truth.imgs}
    evaluator = CocoEvaluator(ground_truth)
    for batch in batches(predictions, sorted(predictions)):
        evaluator.update(batch)
    evaluator.synchronize_between_processes()
    stats = finish(evaluator).stats
    assert stats[0] == 0 and stats[8] == 0  # AP and AR@100


def test_nothing_evaluated_gives_missing_stats(ground_truth):
    evaluator = CocoEvaluator(ground_truth)
    evaluator.update({})
    evaluator.synchronize_between_processes()
    with pytest.warns(UserWarning, match="no image"):
        stats = finish(evaluator).stats
    assert stats.tolist() == [-1.0] * 12


def test_misuse_is_reported(ground_truth):
    evaluator = CocoEvaluator(ground_truth)
    with pytest.raises(ValueError, match="9999"):
        evaluator.update({9999: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}})
    with pytest.raises(RuntimeError, match="synchronize"):
        evaluator.accumulate()
    with pytest.raises(ValueError, match="segm"):
        CocoEvaluator(ground_truth, ("segm",))
