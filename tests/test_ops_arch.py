"""CUDA archs of the deformable-attention kernels: what is built, where it runs, and the fallback.

No GPU is needed except for the last test: devices are simulated by monkeypatching ``torch.cuda`` and
the extension object.
"""
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.utils.cpp_extension

from models.ops import archs, cuda_impl, functional
from models.ops.archs import DEFAULT_ARCH_LIST, Arch, arch_list_for, can_run, parse_arch_list, resolve_arch_list
from models.ops.pytorch_impl import ms_deform_attn_pytorch
from test_ms_deform_attn import make_inputs

REPO = Path(__file__).resolve().parents[1]
CUDA0 = torch.device("cuda", 0)
NO_KERNEL_IMAGE_ERROR = "CUDA error: no kernel image is available for execution on the device"
# torch 2.14.1 cu130's torch.cuda.get_arch_list().
TORCH_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]


def simulate_gpus(monkeypatch, capabilities, arch_names=TORCH_ARCHS):
    """Makes torch.cuda report GPUs of these capabilities (none: CUDA unavailable)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(capabilities))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capabilities[index or 0])
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch_names))


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """Forgets per-device verdicts and warnings given so far."""
    monkeypatch.setattr(cuda_impl, "_usable_on_device", {})
    monkeypatch.setattr(functional, "_warned", set())


def install_extension(monkeypatch, extension):
    for module in (cuda_impl, functional):
        monkeypatch.setattr(module, "load_extension", lambda: extension)


def fake_extension(built=None):
    """An extension that fails the test if its kernels are called; ``built=None``: an old build."""
    def kernel(*args):
        raise AssertionError("the CUDA kernel must not be called")

    extension = SimpleNamespace(forward=kernel, backward=kernel)
    if built is not None:
        extension.built_archs = lambda: built
    return extension


class CountingKernel:
    """Stands in for MSDeformAttnCudaFunction: counts calls, raises ``error``."""

    def __init__(self, error):
        self.error, self.calls = error, 0

    def apply(self, *args):
        self.calls += 1
        raise self.error


# ----------------------------------------------------------------------------- arch lists


def test_parse_arch_list():
    assert parse_arch_list("7.5;8.0;9.0+PTX") == [Arch(7, 5), Arch(8, 0), Arch(9, 0, ptx=True)]
    assert parse_arch_list(" 8.6 12.0+PTX ") == [Arch(8, 6), Arch(12, 0, ptx=True)]
    assert parse_arch_list("9.0a") == [Arch(9, 0, specific=True)]
    assert archs.format_arch_list(parse_arch_list(DEFAULT_ARCH_LIST)) == DEFAULT_ARCH_LIST
    for bad in ("", "Ampere", "8", "sm_80", "8.0+ptx"):
        with pytest.raises(ValueError):
            parse_arch_list(bad)


OLD_DEFAULT = "8.0;9.0"
CAN_RUN = {  # built list -> capabilities that run it, out of sm_75, 80, 86, 89, 90, 100, 120
    OLD_DEFAULT: {(8, 0), (8, 6), (8, 9), (9, 0)},
    "8.0;9.0+PTX": {(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)},
    "8.6": {(8, 6), (8, 9)},
    "9.0a+PTX": {(9, 0)},
    "7.5;8.0;9.0+PTX": {(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)},
    DEFAULT_ARCH_LIST: {(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)},
}
DEVICES = [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]


@pytest.mark.parametrize("built", sorted(CAN_RUN))
@pytest.mark.parametrize("capability", DEVICES)
def test_can_run_rule(built, capability):
    """SASS X.y runs on X.z with z >= y; PTX on every capability >= its own; "a" targets on their own."""
    assert can_run(capability, parse_arch_list(built)) == (capability in CAN_RUN[built])


def test_default_list_runs_on_every_gpu_torch_runs_on():
    default = parse_arch_list(DEFAULT_ARCH_LIST)
    for name in TORCH_ARCHS + ["sm_89", "sm_103", "sm_121", "sm_130"]:  # the last: a future GPU, via PTX
        digits = name.removeprefix("sm_")
        assert can_run((int(digits[:-1]), int(digits[-1])), default), name


def test_resolve_honours_the_users_list(monkeypatch):
    simulate_gpus(monkeypatch, [(9, 0)])
    assert resolve_arch_list({"TORCH_CUDA_ARCH_LIST": "8.6;Hopper"}) == "8.6;Hopper"


def test_resolve_builds_for_the_visible_gpus(monkeypatch):
    simulate_gpus(monkeypatch, [(8, 6), (7, 5), (8, 6)])
    assert resolve_arch_list({}) == "7.5;8.6+PTX"
    assert resolve_arch_list({"TORCH_CUDA_ARCH_LIST": "native"}) == "7.5;8.6+PTX"


def test_visible_gpus_are_clamped_to_what_torch_supports():
    supported = [(7, 5), (8, 0), (12, 0)]
    assert arch_list_for([(13, 0), (9, 0)], supported) == "9.0;12.0+PTX"  # newer than nvcc: its PTX JITs
    assert arch_list_for([(7, 0)], supported) == "7.5+PTX"  # older than nvcc's oldest target


@pytest.mark.parametrize("cuda_available", [False, True])  # True: CUDA works, but no device is visible
def test_resolve_without_gpus_builds_the_default_list(monkeypatch, cuda_available):
    simulate_gpus(monkeypatch, [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    assert resolve_arch_list({"TORCH_CUDA_ARCH_LIST": ""}) == DEFAULT_ARCH_LIST


def test_built_archs_flags():
    assert archs.built_archs_flags("7.5;9.0+PTX") == ["-DSAMDETR_BUILT_ARCHS=7.5,9.0+PTX"]
    assert archs.built_archs_flags("Ampere") == []  # unknown list: the extension reports ""


def test_jit_build_uses_and_records_the_resolved_list(monkeypatch):
    simulate_gpus(monkeypatch, [])
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    seen = {}

    def fake_load(**kwargs):
        seen.update(kwargs, arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"))
        return SimpleNamespace()

    monkeypatch.setattr(torch.utils.cpp_extension, "load", fake_load)
    cuda_impl._build_now()
    assert seen["arch_list"] == DEFAULT_ARCH_LIST
    assert "-DSAMDETR_BUILT_ARCHS=7.5,8.0,9.0,10.0,12.0+PTX" in seen["extra_cflags"]
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ


def fake_ops_tree(root: Path) -> Path:
    """A copy of .ci/build_ops.sh and models/ops whose make.sh records its arch list instead of compiling."""
    ops = root / "models" / "ops"
    shutil.copytree(REPO / "models" / "ops" / "src", ops / "src")
    for name in ("setup.py", "archs.py"):
        shutil.copy(REPO / "models" / "ops" / name, ops / name)
    (ops / "make.sh").write_text('echo "$TORCH_CUDA_ARCH_LIST" > built_for.txt; touch fake.so\n')
    (ops / "__init__.py").write_text("def extension_available():\n    return False\n")
    (root / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "build_ops.sh", root / ".ci" / "build_ops.sh")
    cuda = root / "cuda"
    (cuda / "bin").mkdir(parents=True)
    return cuda


def test_ci_build_script_builds_the_default_list_and_keys_the_cache_by_it(tmp_path):
    cuda = fake_ops_tree(tmp_path)
    env = {key: value for key, value in os.environ.items() if key != "TORCH_CUDA_ARCH_LIST"}
    env.update(CUDA_HOME=str(cuda), CUDA_VISIBLE_DEVICES="", XDG_CACHE_HOME=str(tmp_path / "cache"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    script = tmp_path / ".ci" / "build_ops.sh"
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    assert (tmp_path / "models" / "ops" / "built_for.txt").read_text().strip() == DEFAULT_ARCH_LIST
    subprocess.run(["bash", str(script)], env={**env, "TORCH_CUDA_ARCH_LIST": "8.6"}, check=True,
                   capture_output=True)
    assert (tmp_path / "models" / "ops" / "built_for.txt").read_text().strip() == "8.6"
    assert len(list((tmp_path / "cache" / "samdetr-ops").iterdir())) == 2  # one cache entry per list


# ----------------------------------------------------------------------------- runtime check and fallback


def test_kernel_usable_follows_the_built_archs_once_per_device(monkeypatch, fresh_dispatch):
    install_extension(monkeypatch, fake_extension(OLD_DEFAULT))
    lookups = []
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda index: lookups.append(index) or [(7, 5), (8, 6), (12, 0)][index])
    assert [cuda_impl.kernel_usable(torch.device("cuda", index)) for index in (0, 1, 2)] == [False, True, False]
    assert cuda_impl.kernel_usable(CUDA0) is False
    assert lookups == [0, 1, 2]  # cached per device index


@pytest.mark.parametrize("extension, usable", [(fake_extension(None), True), (fake_extension(""), True),
                                               (fake_extension("Ampere"), True), (None, False)])
def test_kernel_usable_with_unknown_archs_or_no_extension(monkeypatch, fresh_dispatch, extension, usable):
    """An old build (no built_archs()) or an unparsable list is tried; no extension is not."""
    install_extension(monkeypatch, extension)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    assert cuda_impl.kernel_usable(CUDA0) is usable


def run_twice_on_simulated_cuda(kernel=None):
    """Two calls of the CUDA branch of ms_deform_attn on CPU tensors -> (outputs, expected, warnings)."""
    inputs = make_inputs(torch.float32)
    expected = ms_deform_attn_pytorch(*inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [functional._ms_deform_attn_cuda(CUDA0, *inputs) for _ in range(2)]
    return outputs, expected, [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_unbuilt_arch_falls_back_to_pytorch_with_one_warning(monkeypatch, fresh_dispatch):
    install_extension(monkeypatch, fake_extension(OLD_DEFAULT))
    monkeypatch.setattr(functional, "MSDeformAttnCudaFunction", CountingKernel(AssertionError("kernel called")))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    outputs, expected, caught = run_twice_on_simulated_cuda()
    for output in outputs:
        torch.testing.assert_close(output, expected)
    assert functional.MSDeformAttnCudaFunction.calls == 0
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "sm_75" in message and OLD_DEFAULT in message
    assert 'TORCH_CUDA_ARCH_LIST="7.5" bash models/ops/make.sh' in message


def test_missing_kernel_image_falls_back_once_and_is_remembered(monkeypatch, fresh_dispatch):
    """The safety net for builds without a recorded list: the driver's error at the first call."""
    install_extension(monkeypatch, fake_extension(None))
    kernel = CountingKernel(RuntimeError(NO_KERNEL_IMAGE_ERROR))
    monkeypatch.setattr(functional, "MSDeformAttnCudaFunction", kernel)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (12, 0))
    outputs, expected, caught = run_twice_on_simulated_cuda()
    for output in outputs:
        torch.testing.assert_close(output, expected)
    assert kernel.calls == 1
    assert len(caught) == 1 and "sm_120" in str(caught[0].message)
    assert cuda_impl.kernel_usable(CUDA0) is False


def test_other_kernel_errors_are_not_swallowed(monkeypatch, fresh_dispatch):
    install_extension(monkeypatch, fake_extension(None))
    monkeypatch.setattr(functional, "MSDeformAttnCudaFunction", CountingKernel(RuntimeError("CUDA out of memory")))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    with pytest.raises(RuntimeError, match="out of memory"):
        functional._ms_deform_attn_cuda(CUDA0, *make_inputs(torch.float32))
    assert cuda_impl.kernel_usable(CUDA0) is True


def test_missing_extension_keeps_its_own_warning(monkeypatch, fresh_dispatch):
    install_extension(monkeypatch, None)
    monkeypatch.setattr(functional, "extension_error", lambda: "samdetr_ms_deform_attn is not built")
    outputs, expected, caught = run_twice_on_simulated_cuda()
    torch.testing.assert_close(outputs[1], expected)
    assert len(caught) == 1 and "CUDA extension unavailable (samdetr_ms_deform_attn is not built)" in str(
        caught[0].message)


# ----------------------------------------------------------------------------- the compiled extension

needs_extension = pytest.mark.skipif(not cuda_impl.extension_available(),
                                     reason="needs the compiled extension (models/ops/make.sh)")


@needs_extension
def test_compiled_extension_reports_its_archs():
    """The list lives in the binary itself, so a copied .so keeps it."""
    built = cuda_impl.load_extension().built_archs()
    assert cuda_impl.built_archs(cuda_impl.load_extension()) == parse_arch_list(built) != []


@needs_extension
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_runs_on_this_gpu_and_kernel_usable_agrees():
    device = torch.device("cuda", torch.cuda.current_device())
    capability = torch.cuda.get_device_capability(device)
    built = cuda_impl.built_archs(cuda_impl.load_extension())
    assert built is None or can_run(capability, built)
    assert cuda_impl.kernel_usable(device)
    cpu = make_inputs(torch.float32)
    gpu = [t.detach().to(device) for t in cpu]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output = cuda_impl.MSDeformAttnCudaFunction.apply(*gpu)
    torch.testing.assert_close(output.cpu(), ms_deform_attn_pytorch(*cpu), rtol=1e-4, atol=1e-4)
