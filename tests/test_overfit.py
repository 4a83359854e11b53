"""The whole training stack can learn: it overfits a few generated images.

Model, criterion, matcher, train_one_epoch and evaluate together must reach a high AP50 on the
images they were trained on (the `overfitted` fixture of conftest.py: a small model from scratch,
no augmentation, a few hundred steps on the CPU).
"""
import pytest

from conftest import OVERFIT_STEPS

MIN_AP50 = 0.5


@pytest.mark.slow
def test_overfits_a_few_images(overfitted):
    ap, ap50 = overfitted.stats["coco_eval_bbox"][:2]
    assert ap50 >= MIN_AP50, f"AP50 {ap50:.3f} (AP {ap:.3f}) after {OVERFIT_STEPS} steps"
