"""--backbone_weights FILE: the ResNet's ImageNet weights from a local file (torchvision's layout,
or nested and prefixed as training frameworks save them) go in exactly as torchvision's own do;
a file that does not fit, a failed download and contradicting flags stop with clear messages.
No test touches the network: torchvision's download is replaced or made to fail."""
from typing import Dict
from urllib.error import URLError

import pytest
import torch
import torchvision
from torch import Tensor

import main
from models.backbone import SKIP_PRETRAINED_ENV, BackboneWeightsError, Backbone, build_backbone
from util.resume import FLAG_RULES

NAME = "resnet18"  # the smallest ResNet: builds in a fraction of a second
TORCHVISION_FILE = "resnet18-f37072fd.pth"  # the file name of torchvision's ResNet18 IMAGENET1K_V1
IMAGE = (1, 3, 64, 96)  # (B, 3, H, W) of a forward check


@pytest.fixture(autouse=True)
def pretrained_allowed(monkeypatch):
    """The environment switch that turns ImageNet weights off must not hide the file."""
    monkeypatch.delenv(SKIP_PRETRAINED_ENV, raising=False)


def random_resnet_state(name: str = NAME, seed: int = 0) -> Dict[str, Tensor]:
    """A torchvision ResNet's state dict (fc.* and num_batches_tracked included, as torchvision
    saves it) with random weights and BatchNorm statistics, so that freezing them changes numbers."""
    torch.manual_seed(seed)
    resnet = torchvision.models.get_model(name, weights=None)
    for module in resnet.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_()
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return {k: v.clone() for k, v in resnet.state_dict().items()}


def parse(*flags):
    return main.get_args_parser().parse_args(["--backbone", NAME, "--device", "cpu", "--hidden_dim", "64",
                                              *map(str, flags)])


def body_state(joiner) -> Dict[str, Tensor]:
    return joiner[0].body.state_dict()


def assert_holds(joiner, state: Dict[str, Tensor]) -> None:
    """Every tensor of the built backbone's ResNet equals the state dict's of the same name."""
    body = body_state(joiner)
    assert body and all(torch.equal(tensor, state[key]) for key, tensor in body.items())


def test_a_torchvision_file_loads_as_torchvisions_own_weights(tmp_path, monkeypatch):
    state = random_resnet_state()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    from_file = build_backbone(parse("--backbone_weights", path))
    assert_holds(from_file, state)
    # torchvision's path, its download replaced by the same state dict
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url",
                        lambda url, *a, **k: {key: v.clone() for key, v in state.items()})
    downloaded = build_backbone(parse())
    assert_holds(downloaded, state)
    # the norms are frozen alike (FrozenBatchNorm2d, the same affine maps): the same features
    image = torch.rand(IMAGE, generator=torch.Generator().manual_seed(0))
    from_file.eval()
    downloaded.eval()
    with torch.no_grad():
        assert torch.equal(from_file[0].body(image)[-1], downloaded[0].body(image)[-1])
    body = from_file[0].body
    assert body.frozen_norms and type(body.layer4[1].bn2) is torchvision.ops.FrozenBatchNorm2d


@pytest.mark.parametrize("wrap", [
    lambda s: {"state_dict": {f"module.encoder.{k}": v for k, v in s.items()}, "epoch": 100},  # MoCo / DINO style
    lambda s: {"model": {f"backbone.{k}": v for k, v in s.items()}, "args": {"lr": 0.1}},  # classification recipes
    lambda s: {f"module.{k}": v for k, v in s.items() if not k.startswith("fc.")},  # DDP-saved, no classifier
    lambda s: {k: v for k, v in s.items() if not k.endswith("num_batches_tracked")},  # no BatchNorm step counts
], ids=["state_dict+module.encoder", "model+backbone", "module-no-fc", "no-step-counts"])
def test_nested_and_prefixed_files_load_the_same_weights(tmp_path, wrap):
    state = random_resnet_state(seed=1)
    path = tmp_path / "ssl.pth"
    torch.save(wrap(state), path)
    assert_holds(build_backbone(parse("--backbone_weights", path)), state)


def test_trainable_norms_take_the_file_too(tmp_path):
    state = random_resnet_state(seed=2)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    backbone = Backbone(NAME, train_backbone=True, multiscale=True, dilation=False, pretrained=True,
                        norm="batch", weights_file=str(path))
    held = backbone.body.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in held.items() if not k.endswith("num_batches_tracked"))


def test_a_file_of_another_resnet_names_the_file_the_flag_and_both_layouts(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(random_resnet_state(), path)
    with pytest.raises(BackboneWeightsError) as error:
        build_backbone(parse("--backbone_weights", path, "--backbone", "resnet50"))
    message = str(error.value)
    for part in (str(path), "--backbone resnet50", "resnet18-like layout (BasicBlock)",
                 "resnet50-like layout (Bottleneck)", "pass --backbone resnet18", "missing",
                 "layer1.0.conv3.weight"):
        assert part in message


def test_missing_and_misshaped_keys_are_named(tmp_path):
    state = random_resnet_state()
    del state["layer4.1.bn2.running_var"]
    state["layer2.0.conv1.weight"] = torch.zeros(7, 64, 3, 3)
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    with pytest.raises(BackboneWeightsError) as error:
        build_backbone(parse("--backbone_weights", path))
    message = str(error.value)
    for part in (str(path), f"--backbone {NAME}", "missing (1): layer4.1.bn2.running_var",
                 "unexpected (1): layer5.0.conv1.weight", "layer2.0.conv1.weight (7, 64, 3, 3) (needs (128, 64, 3, 3))"):
        assert part in message


def test_files_without_one_resnet_are_refused(tmp_path):
    none = tmp_path / "none.pth"
    torch.save({"teacher": {"head.weight": torch.zeros(2)}}, none)
    with pytest.raises(BackboneWeightsError, match=r"holds no ResNet.*conv1\.weight.*teacher"):
        build_backbone(parse("--backbone_weights", none))
    state = random_resnet_state()
    two = tmp_path / "moco.pth"
    torch.save({"state_dict": {f"module.encoder_{e}.{k}": v for e in "qk" for k, v in state.items()}}, two)
    with pytest.raises(BackboneWeightsError, match="'module.encoder_k.', 'module.encoder_q.'"):
        build_backbone(parse("--backbone_weights", two))


def test_a_corrupt_file_is_named(tmp_path):
    path = tmp_path / "page.pth"
    path.write_text("<html>not found</html>")
    with pytest.raises(BackboneWeightsError, match=f"--backbone_weights.*{path}"):
        build_backbone(parse("--backbone_weights", path))


def test_a_failed_download_names_the_flag_the_file_and_the_cache(tmp_path, monkeypatch):
    def offline(url, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache: torchvision downloads
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(BackboneWeightsError) as error:
        build_backbone(parse())
    message = str(error.value)
    for part in ("--backbone_weights", TORCHVISION_FILE, str(tmp_path / "checkpoints" / TORCHVISION_FILE),
                 "URLError", "name resolution"):
        assert part in message


def test_the_flag_checks(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(random_resnet_state(), path)
    with pytest.raises(SystemExit, match="--no_pretrained_backbone"):
        main.check_run_flags(parse("--backbone_weights", path, "--no_pretrained_backbone"))
    with pytest.raises(SystemExit, match="no such file"):
        main.check_run_flags(parse("--backbone_weights", tmp_path / "absent.pth"))
    main.check_run_flags(parse("--backbone_weights", path))
    # a run flag: the weights are in the checkpoint, a resume need not give the same file
    assert "backbone_weights" not in FLAG_RULES


def test_a_resume_does_not_read_the_file(tmp_path):
    """The checkpoint replaces every weight: the file, like torchvision's download, is not read."""
    path = tmp_path / "page.pth"
    path.write_text("<html>not found</html>")  # reading it would fail
    build_backbone(parse("--backbone_weights", path, "--resume", tmp_path / "checkpoint.pth"))
