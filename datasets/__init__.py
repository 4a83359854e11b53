"""Dataset factory and helpers shared by training and evaluation."""
from typing import Dict

import torch.utils.data

from datasets.coco import CocoDetection
from datasets.coco import build as build_coco

SUPPORTED_DATASETS = ("coco",)
MAX_SUBSET_NESTING = 10  # guards against a cyclic wrapper


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object behind ``dataset`` (unwrapping torch Subsets), else None."""
    for _ in range(MAX_SUBSET_NESTING):
        if not isinstance(dataset, torch.utils.data.Subset):
            break
        dataset = dataset.dataset
    if isinstance(dataset, CocoDetection):
        return dataset.coco
    return getattr(dataset, "coco", None)


def category_names(coco_api) -> Dict[int, str]:
    """Category id -> name from a COCO api's ``categories`` (plain types, so that checkpoints can
    store it); {} without a COCO api."""
    if coco_api is None:
        return {}
    return {int(c["id"]): str(c["name"]) for c in coco_api.dataset.get("categories", [])}


def build_dataset(image_set: str, args):
    """Dataset for 'train' or 'val' chosen by ``args.dataset_file`` (default 'coco')."""
    dataset_file = getattr(args, "dataset_file", "coco")
    if dataset_file == "coco":
        return build_coco(image_set, args)
    raise ValueError(f"unsupported --dataset_file {dataset_file!r}; supported: {', '.join(SUPPORTED_DATASETS)} "
                     "(any COCO-format dataset works with --dataset_file coco and "
                     "--train_img_dir/--train_ann/--val_img_dir/--val_ann)")
