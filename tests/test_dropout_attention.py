"""The CPU forms of dropout and of attention with dropout (models/code_path.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from models.attention import attention
from models.code_path import gpu_code_path
from models.mlp import dropout


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket).replace("aten.", ""))
        return func(*args, **(kwargs or {}))


def test_cpu_dropout_keeps_one_minus_p_and_scales_the_kept():
    p = 0.3
    x = torch.rand(400, 500) + 1.0  # no zeros of its own
    x.requires_grad_()
    torch.manual_seed(0)
    y = dropout(x, p, training=True)
    kept = y != 0
    n = kept.numel()
    # binomial: 5 standard deviations
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    torch.testing.assert_close(y[kept], x.detach()[kept] / (1 - p))
    grad = torch.randn_like(x)
    y.backward(grad)
    torch.testing.assert_close(x.grad, torch.where(kept, grad / (1 - p), 0.0))
    assert dropout(x, p, training=False) is x and dropout(x, 0.0, training=True) is x


def test_dropout_takes_the_fused_kernel_on_the_gpu_path_and_uniform_draws_on_the_cpu():
    x = torch.randn(8, 16)
    with OpNames() as cpu:
        dropout(x, 0.1, training=True)
    with gpu_code_path(), OpNames() as gpu:
        dropout(x, 0.1, training=True)
    assert "native_dropout" in gpu.names
    assert "rand_like" in cpu.names and not any("bernoulli" in n or "dropout" in n for n in cpu.names)


def test_written_out_attention_is_softmax_dropout_matmul(monkeypatch):
    """Same draws (re-seeded) as a hand-written reference; without dropout, SDPA itself."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 10, 8, generator=gen), torch.randn(2, 4, 12, 8, generator=gen)
    v = torch.randn(2, 4, 12, 6, generator=gen)
    bias = torch.zeros(2, 1, 1, 12).masked_fill_(torch.rand(2, 1, 1, 12, generator=gen) < 0.3, float("-inf"))
    p = 0.25
    torch.manual_seed(5)
    got = attention(q, k, v, bias, p)
    torch.manual_seed(5)
    probs = ((q @ k.transpose(-2, -1)) / 8 ** 0.5 + bias).softmax(-1)
    keep = torch.rand_like(probs) >= p
    torch.testing.assert_close(got, torch.where(keep, probs / (1 - p), 0.0) @ v)
    torch.testing.assert_close(attention(q, k, v, bias, 0.0), F.scaled_dot_product_attention(q, k, v, bias))
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(kw) or sdpa(*a, **kw))
    attention(q, k, v, bias, p)
    assert calls == []
    with gpu_code_path():
        attention(q, k, v, bias, p)
    assert calls and calls[0]["dropout_p"] == p


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_written_out_attention_gradients_match_sdpa_without_dropout(p):
    """With p = 0 both run SDPA; with p > 0 and every mask kept (p tiny), the written-out form's
    gradients equal SDPA's."""
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(1, 2, 5, 4, generator=gen).requires_grad_() for _ in range(3)]
    want = torch.autograd.grad(F.scaled_dot_product_attention(*inputs).sum(), inputs)
    got = torch.autograd.grad(attention(*inputs, None, 1e-12 if p else 0.0).sum(), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_environment_variable_selects_the_gpu_code_path_for_a_process():
    import os
    import subprocess
    import sys
    probe = "import torch; from models.code_path import cpu_form; print(cpu_form(torch.zeros(1)))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for value, expected in (("1", "False"), ("0", "True")):
        env = dict(os.environ, SAMDETR_GPU_CODE_PATH=value)
        out = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
