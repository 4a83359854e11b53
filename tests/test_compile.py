"""--compile: torch.compile gives the same outputs as eager on CPU."""
import pytest
import torch

from main import get_args_parser
from models import build_model


@pytest.mark.slow
def test_compiled_model_matches_eager():
    args = get_args_parser().parse_args(
        ["--backbone", "resnet18", "--no_pretrained_backbone", "--device", "cpu", "--num_classes", "4",
         "--enc_layers", "1", "--dec_layers", "2", "--hidden_dim", "64", "--nheads", "4",
         "--dim_feedforward", "128", "--num_queries", "10", "--smca", "--epochs", "12"])
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    model.eval()
    images = [torch.randn(3, 96, 128), torch.randn(3, 64, 96)]
    with torch.no_grad():
        eager = model(images)
        compiled = torch.compile(model)(images)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(compiled["aux_outputs"], eager["aux_outputs"]):
        torch.testing.assert_close(ours["pred_boxes"], theirs["pred_boxes"], rtol=1e-4, atol=1e-4)
