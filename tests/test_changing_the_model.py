"""Researchers change the decoder's modules: a hook, a wrapper (LoRA, quantised layers) or a
replaced module must take effect in training and evaluation alike, on the CPU's fast forms too.
Every fast form that reads a module's weights instead of calling it steps aside for a module it
does not know, with one note (models/code_path.py)."""
import warnings

import pytest
import torch
from torch import nn

import main
from e2e import TINY
from models import build_model
from models import code_path

IMAGES = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(0)),
          torch.rand(3, 112, 96, generator=torch.Generator().manual_seed(1))]
TARGETS = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.4, 0.4, 0.3, 0.2], [0.7, 0.6, 0.2, 0.3]])},
           {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]
SCALE = 2.0  # what the hooks below multiply a module's output by


def build(*flags):
    args = main.get_args_parser().parse_args(TINY + list(flags))
    main.check_args(args)
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    return model, criterion


@pytest.fixture(autouse=True)
def fresh_notes():
    code_path._noted.clear()
    yield
    code_path._noted.clear()


def loss_of(model, criterion):
    losses = criterion(model(IMAGES), TARGETS)
    return sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)


def _module(model, name):
    return model.get_submodule(name)


HOOKED = ["transformer.decoder.layers.0.ca_v_proj", "transformer.decoder.layers.1.attn1",
          "class_embed.1", "transformer.decoder.layers.1.sa_qcontent_proj",
          "transformer.decoder.layers.1.ca_kpos_sine_proj", "transformer.decoder.layers.0.point1",
          "backbone.0.body.layer1.0.conv1", "backbone.0.body.layer2.0.bn2"]


@pytest.mark.parametrize("name", HOOKED)
@pytest.mark.parametrize("training", [True, False])
def test_a_forward_hook_fires_and_takes_effect(name, training):
    model, _ = build()
    model.train(training)
    with torch.set_grad_enabled(training):
        plain = model(IMAGES)["pred_logits"]
    calls = []

    def scale(module, args, output):
        calls.append(module)
        return output * SCALE

    handle = _module(model, name).register_forward_hook(scale)
    with torch.set_grad_enabled(training), warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        hooked = model(IMAGES)["pred_logits"]
    handle.remove()
    assert len(calls) == 1
    if name == "class_embed.1":  # the last layer's head: its logits scale exactly
        torch.testing.assert_close(hooked, plain * SCALE)
    else:
        assert not torch.allclose(hooked, plain, atol=1e-4)
    with torch.set_grad_enabled(training):
        torch.testing.assert_close(model(IMAGES)["pred_logits"], plain)  # and the fast forms are back


class LoRALinear(nn.Linear):
    """A low-rank update beside a frozen nn.Linear, as PEFT's LoRA adds it (a subclass here)."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__(base.in_features, base.out_features)
        self.load_state_dict(base.state_dict())
        self.weight.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    def forward(self, x):
        return super().forward(x) + x @ self.lora_a.t() @ self.lora_b.t()


@pytest.mark.parametrize("name", ["ca_v_proj", "ca_kcontent_proj", "attn2", "sa_kpos_proj"])
def test_a_lora_wrapped_linear_trains_and_evaluates(name):
    model, criterion = build()
    plain_eval = model.eval()(IMAGES)["pred_logits"]
    layer = model.transformer.decoder.layers[1]
    setattr(layer, name, LoRALinear(getattr(layer, name)))
    model.train()
    with pytest.warns(UserWarning, match="running the plain path"):
        loss_of(model, criterion).backward()
    wrapped = getattr(layer, name)
    assert wrapped.lora_a.grad is not None and wrapped.lora_a.grad.abs().sum() > 0
    assert wrapped.weight.grad is None
    with torch.no_grad():
        assert (model.eval()(IMAGES)["pred_logits"] - plain_eval).abs().max() > 1e-5


def test_class_heads_wrapped_step_aside_and_train():
    model, criterion = build()
    model.class_embed[0] = LoRALinear(model.class_embed[0])
    model.train()
    loss_of(model, criterion).backward()
    assert model.class_embed[0].lora_b.grad.abs().sum() > 0


def _replace_point1_by_3x3(model):
    for layer in model.transformer.decoder.layers:
        conv = layer.point1[0]
        torch.manual_seed(3)
        layer.point1[0] = nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, padding=1)


def test_point1_replaced_by_a_3x3_convolution_trains_and_matches_the_plain_path():
    """The CPU's separable RoIs apply point1 without the RoI tensor only for the official 1x1
    convolution; a 3x3 one gets the RoI tensor made in full, the same numbers as the kernel's."""
    results = {}
    for form in ("separable", "kernel"):
        model, criterion = build("--roi_align", form)
        _replace_point1_by_3x3(model)
        model.train()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = loss_of(model, criterion)
            loss.backward()
        notes = [str(w.message) for w in caught if "point1" in str(w.message)]
        assert len(notes) == (1 if form == "separable" else 0)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "point1" in n}
        results[form] = (loss.detach(), grads)
        conv = model.transformer.decoder.layers[0].point1[0]
        before = conv.weight.detach().clone()
        torch.optim.AdamW(model.parameters(), lr=1e-3).step()  # and it trains: a step moves the new conv
        assert not torch.equal(conv.weight.detach(), before)
    (loss_s, grads_s), (loss_k, grads_k) = results["separable"], results["kernel"]
    torch.testing.assert_close(loss_s, loss_k, rtol=1e-4, atol=1e-4)
    for name in grads_k:
        assert grads_k[name].abs().sum() > 0
        torch.testing.assert_close(grads_s[name], grads_k[name], rtol=1e-3, atol=1e-4)


def test_the_note_is_given_once():
    model, _ = build("--roi_align", "separable")
    _replace_point1_by_3x3(model)
    model.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(IMAGES)
            model(IMAGES)
    assert sum("point1" in str(w.message) for w in caught) == 1


def test_plain_modules_take_the_fast_forms_without_a_note():
    model, criterion = build("--roi_align", "separable")
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_of(model, criterion).backward()
    assert not [w for w in caught if "plain path" in str(w.message)]


def test_is_plain_rules():
    linear = nn.Linear(2, 2)
    assert code_path.is_plain(linear, nn.Linear)
    assert not code_path.is_plain(LoRALinear(linear), nn.Linear)
    handle = linear.register_forward_pre_hook(lambda m, a: None)
    assert not code_path.is_plain(linear, nn.Linear)
    handle.remove()
    assert code_path.is_plain(linear, nn.Linear)
    linear.register_full_backward_hook(lambda m, gi, go: None)
    assert not code_path.is_plain(linear, nn.Linear)
    parametrized = nn.Linear(2, 2)
    torch.nn.utils.parametrize.register_parametrization(parametrized, "weight", nn.Identity())
    assert not code_path.is_plain(parametrized, nn.Linear)
