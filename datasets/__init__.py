"""Dataset factory and helpers shared by training and evaluation."""
from typing import Dict

import torch.utils.data

from datasets.coco import CocoDetection
from datasets.coco import build as build_coco

SUPPORTED_DATASETS = ("coco",)
MAX_SUBSET_NESTING = 10  # guards against a cyclic wrapper


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object behind ``dataset`` (unwrapping torch Subsets), else None.

    For a CocoDetection it is built here, on first use, from the dataset's annotation file.
    """
    for _ in range(MAX_SUBSET_NESTING):
        if not isinstance(dataset, torch.utils.data.Subset):
            break
        dataset = dataset.dataset
    if isinstance(dataset, CocoDetection):
        return dataset.coco
    return getattr(dataset, "coco", None)


def category_names(dataset) -> Dict[int, str]:
    """Category id -> name of a dataset's annotation file (plain types, so that checkpoints can
    store it); {} when it has none. Read from the flat annotations: building the pycocotools
    object of a training set would parse its whole json again."""
    for _ in range(MAX_SUBSET_NESTING):
        if not isinstance(dataset, torch.utils.data.Subset):
            break
        dataset = dataset.dataset
    annotations = getattr(dataset, "annotations", None)
    if annotations is None:
        return {}
    return dict(zip(annotations.category_ids.tolist(), annotations.category_names.tolist()))


def build_dataset(image_set: str, args):
    """Dataset for 'train' or 'val' chosen by ``args.dataset_file`` (default 'coco')."""
    dataset_file = getattr(args, "dataset_file", "coco")
    if dataset_file == "coco":
        return build_coco(image_set, args)
    raise ValueError(f"unsupported --dataset_file {dataset_file!r}; supported: {', '.join(SUPPORTED_DATASETS)} "
                     "(any COCO-format dataset works with --dataset_file coco and "
                     "--train_img_dir/--train_ann/--val_img_dir/--val_ann)")
