"""Host-device round trips of a training step, and the op count of a step, on the CPU.

On a GPU every read of device values by the host (.item(), .tolist(), .cpu(), a tensor in an
`if`) waits for the queued work, and a tensor built from host values inside the step is a copy
the host waits for too. A launch-bound step pays for every such wait, so the step allows two:
the matcher's cost matrices and one read of all logged loss values. Everything that crosses
deliberately goes through util.misc.HostCopy / to_device_async, which this test watches; any
other crossing is counted as a failure. The code under test takes the same branches as on a GPU,
except inside those two helpers (pinned memory, events) and the CPU-only thread pool of RoIAlign,
which crosses nothing; RoIAlign runs both as on a GPU (gpu_code_path) and in the CPU's separable
form.
"""
import contextlib
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import engine
import util.misc as misc
from main import FUSED_ADAMW_DEVICES, get_args_parser, param_groups
from models import build_model
from models.code_path import gpu_code_path
from util.misc import nested_tensor_from_tensor_list

TINY_SMCA = ["--backbone", "resnet18", "--no_pretrained_backbone", "--device", "cpu", "--num_classes", "5",
             "--enc_layers", "1", "--dec_layers", "3", "--hidden_dim", "64", "--nheads", "4",
             "--dim_feedforward", "128", "--num_queries", "12", "--smca", "--epochs", "12"]
# ops whose result the host has to wait for (or that copy host data in)
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "lift_fresh",
            "item", "equal", "is_nonzero"}
HOST_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


class RoundTrips(TorchDispatchMode):
    """Counts sanctioned transfers (HostCopy / to_device_async) and every other host crossing."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.sanctioned_reads = 0
        self.sanctioned_uploads = 0
        self.other = []
        self._inside = 0
        mode = self
        for name in HOST_METHODS:
            original = getattr(torch.Tensor, name)

            def wrapper(tensor, *args, _original=original, _name=name, **kwargs):
                if not mode._inside:
                    mode.other.append(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, wrapper)
        original_init, original_upload = misc.HostCopy.__init__, misc.to_device_async

        def host_copy_init(copy, tensor):
            mode.sanctioned_reads += 1
            with mode.sanctioned():
                original_init(copy, tensor)

        def upload(array, device):
            mode.sanctioned_uploads += 1
            with mode.sanctioned():
                return original_upload(array, device)
        original_wait = misc.HostCopy.wait

        def wait(copy):
            with mode.sanctioned():
                return original_wait(copy)
        monkeypatch.setattr(misc.HostCopy, "__init__", host_copy_init)
        monkeypatch.setattr(misc.HostCopy, "wait", wait)
        for module in list(sys.modules.values()):
            if getattr(module, "to_device_async", None) is original_upload:
                monkeypatch.setattr(module, "to_device_async", upload)

    @contextlib.contextmanager
    def sanctioned(self):
        self._inside += 1
        try:
            yield
        finally:
            self._inside -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket).replace("aten.", "")
        if name in SYNC_OPS and not self._inside:
            self.other.append(name)
        return func(*args, **(kwargs or {}))


def _setup(flags):
    args = get_args_parser().parse_args(flags)
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    optimizer = torch.optim.AdamW(param_groups(model, args), lr=1e-4, weight_decay=1e-4,
                                  fused="cpu" in FUSED_ADAMW_DEVICES)
    gen = torch.Generator().manual_seed(1)
    samples = nested_tensor_from_tensor_list([torch.randn(3, 96, 128, generator=gen), torch.randn(3, 80, 96, generator=gen)])
    targets = [{"labels": torch.tensor([1, 4, 2]), "boxes": torch.rand(3, 4, generator=gen) * 0.4 + 0.2},
               {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])}]
    return model, criterion, optimizer, samples, targets


# reduced models of each architecture: SAM-DETR single- and multi-scale with SMCA, and DETR
TINY_MODELS = {"smca": TINY_SMCA, "ms_smca": TINY_SMCA + ["--multiscale"],
               "detr": [f for f in TINY_SMCA if f != "--smca"] + ["--meta_arch", "detr", "--dropout", "0.1"]}


@pytest.mark.parametrize("roi_form", ["kernel", "separable"])
@pytest.mark.parametrize("config", list(TINY_MODELS))
def test_train_step_makes_two_round_trips(monkeypatch, config, roi_form):
    """With RoIs from torchvision's kernel, as on a GPU (all of the GPU's ops), and in the CPU's
    forms (DETR has no RoIs: there the two runs differ in the dropout forms only)."""
    model, criterion, optimizer, samples, targets = _setup(TINY_MODELS[config])
    form = gpu_code_path() if roi_form == "kernel" else contextlib.nullcontext()
    with form:
        engine.train_step(model, criterion, samples, targets, optimizer, torch.device("cpu"), 0.1)  # warm-up
        with RoundTrips(monkeypatch) as trips:
            logged = engine.train_step(model, criterion, samples, targets, optimizer, torch.device("cpu"), 0.1)
    assert trips.other == [], f"host-device crossings outside the sanctioned two: {trips.other}"
    assert trips.sanctioned_reads == 2, "expected one cost-matrix read and one loss read"
    assert set(logged) >= {"loss", "loss_ce", "loss_bbox_unscaled", "class_error"}


def test_round_trip_counter_sees_a_stray_item(monkeypatch):
    """The counter above can fail: an .item() inside the step is caught."""
    model, criterion, optimizer, samples, targets = _setup(TINY_SMCA)
    original = criterion.layer_losses

    def with_item(outputs, targets, **kwargs):
        losses = original(outputs, targets, **kwargs)
        losses["loss_ce"].sum().item()
        return losses
    monkeypatch.setattr(criterion, "layer_losses", with_item)
    with RoundTrips(monkeypatch) as trips:
        engine.train_step(model, criterion, samples, targets, optimizer, torch.device("cpu"), 0.1)
    assert "Tensor.item" in trips.other


def test_non_finite_loss_stops_before_the_step(monkeypatch):
    model, criterion, optimizer, samples, targets = _setup(TINY_SMCA)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    original = criterion.layer_losses

    def nan_losses(outputs, targets, **kwargs):
        losses = original(outputs, targets, **kwargs)
        losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
        return losses
    monkeypatch.setattr(criterion, "layer_losses", nan_losses)
    with pytest.raises(engine.NonFiniteLossError, match="loss_bbox=nan"):
        engine.train_step(model, criterion, samples, targets, optimizer, torch.device("cpu"), 0.1)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
