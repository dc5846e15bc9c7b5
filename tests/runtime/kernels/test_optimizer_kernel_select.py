"""Kernel selection and the contract every optimizer kernel available on CPU must meet."""

from __future__ import annotations

import warnings

import pytest
import torch

from kernel_numerics import assert_matches_torch
from zeroplan.runtime.kernels import (
    OPTIMIZER_KERNELS,
    KernelWarning,
    adam_step,
    available_optimizer_kernels,
    resolve_optimizer_kernel,
)
from zeroplan.runtime.kernels import select

pytestmark = pytest.mark.numerics  # rerun under another vector unit (Makefile: test-capability)


@pytest.fixture
def fresh_notices():
    """Forget which fallbacks were announced, so a test sees its own first notice."""
    select._announced.clear()
    yield
    select._announced.clear()


def test_cpu_kernels_fastest_first(cpu_adam_ext):
    assert available_optimizer_kernels("cpu") == ("cpu_adam", "torch_fused", "torch_foreach")
    assert set(available_optimizer_kernels("cpu")) <= set(OPTIMIZER_KERNELS)


@pytest.mark.parametrize("kernel", ["cpu_adam", "torch_fused", "torch_foreach"])
def test_runnable_kernel_resolves_to_itself_silently(cpu_adam_ext, kernel):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_optimizer_kernel(kernel, device="cpu") == kernel


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where no GPU exists")
def test_kernel_for_another_device_falls_back_with_one_notice(fresh_notices):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert resolve_optimizer_kernel("cuda_fused", device="cpu") == "torch_foreach"
    notices = [w for w in caught if issubclass(w.category, KernelWarning)]
    assert len(notices) == 1, [str(w.message) for w in caught]
    message = str(notices[0].message)
    assert "cuda_fused" in message and "torch_foreach" in message and "not cpu" in message


def test_unknown_kernel_names_the_argument():
    with pytest.raises(ValueError, match="requested: unknown optimizer kernel 'cpu_adamw'"):
        resolve_optimizer_kernel("cpu_adamw", device="cpu")
    with pytest.raises(ValueError, match="kernel: unknown optimizer kernel"):
        adam_step(param=torch.zeros(2), grad=torch.zeros(2), exp_avg=torch.zeros(2), exp_avg_sq=torch.zeros(2),
                  step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
                  kernel="apex")


def test_torch_fused_refuses_to_drop_bias_correction():
    with pytest.raises(ValueError, match="bias_correction=False is not supported by kernel 'torch_fused'"):
        adam_step(param=torch.zeros(2), grad=torch.zeros(2), exp_avg=torch.zeros(2), exp_avg_sq=torch.zeros(2),
                  step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
                  bias_correction=False, kernel="torch_fused")


def _cpu_kernels() -> list[str]:
    return ["cpu_adam", "torch_fused", "torch_foreach"]


class TestOptimizerKernelContract:
    """What the ZeRO runtime relies on, for each kernel: torch.optim's numbers after 30 steps with
    loss-scale/clip pre-multiplication, an exact bf16 copy, a read-only gradient."""

    @pytest.mark.parametrize("kernel", _cpu_kernels())
    @pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam_l2"])
    def test_matches_torch_optim(self, cpu_adam_ext, kernel, decoupled):
        gen = torch.Generator().manual_seed(11)
        n, scale = 5003, 0.5
        param = torch.randn(n, generator=gen)
        reference = param.clone().requires_grad_(True)
        opt_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        opt = opt_cls([reference], lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.02)
        state = {"param": param, "exp_avg": torch.zeros(n), "exp_avg_sq": torch.zeros(n)}
        copy = torch.empty(n, dtype=torch.bfloat16)
        for step in range(1, 31):
            grad = torch.randn(n, generator=gen)
            reference.grad = grad * scale
            opt.step()
            before = grad.clone()
            ran = adam_step(**state, grad=grad, step=step, lr=3e-3, beta1=0.8, beta2=0.95, eps=1e-6,
                            weight_decay=0.02, decoupled=decoupled, grad_scale=scale, bf16_out=copy,
                            kernel=kernel)
            assert ran == kernel
            assert torch.equal(grad, before), "grad must be read-only"
        assert_matches_torch(state["param"], reference.detach(), "param")
        assert_matches_torch(state["exp_avg"], opt.state[reference]["exp_avg"], "exp_avg")
        assert_matches_torch(state["exp_avg_sq"], opt.state[reference]["exp_avg_sq"], "exp_avg_sq")
        assert torch.equal(copy, state["param"].to(torch.bfloat16))


def _good(**overrides):
    args = dict(param=torch.zeros(8), grad=torch.zeros(8), exp_avg=torch.zeros(8), exp_avg_sq=torch.zeros(8),
                step=1, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
                kernel="cpu_adam")
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"grad": torch.zeros(8, dtype=torch.float64)}, "grad: expected dtype torch.float32"),
        ({"exp_avg": torch.zeros(16)[::2]}, "exp_avg: must be contiguous"),
        ({"exp_avg_sq": torch.zeros(9)}, r"exp_avg_sq: shape \(9,\) != param's \(8,\)"),
        ({"bf16_out": torch.zeros(8)}, "bf16_out: expected dtype torch.bfloat16"),
        ({"bf16_out": torch.zeros(7, dtype=torch.bfloat16)}, "bf16_out: shape"),
        ({"param": [0.0] * 8}, "param: expected a torch.Tensor"),
        ({"step": 0}, "step: must be an int >= 1"),
        ({"beta2": 1.0}, r"beta2: must be in \[0, 1\), got 1.0"),
        ({"lr": float("nan")}, "lr: must be >= 0"),
        ({"grad_scale": float("inf")}, "grad_scale: must be finite"),
        ({"threads": 0}, "threads: must be a positive int"),
        ({"simd": "neon"}, "simd: must be one of"),
        ({"simd": "avx2", "kernel": "torch_foreach"}, "simd: 'avx2' applies to kernel 'cpu_adam' only"),
    ],
)
def test_bad_input_is_a_value_error_naming_the_argument(cpu_adam_ext, overrides, match):
    with pytest.raises(ValueError, match=match):
        adam_step(**_good(**overrides))


def test_forcing_a_simd_path_this_cpu_lacks_is_refused(cpu_adam_ext):
    missing = [p for p in ("avx512", "avx2") if p not in cpu_adam_ext.simd_paths()]
    if not missing:
        pytest.skip("this CPU runs every SIMD path")
    with pytest.raises(ValueError, match=f"simd: '{missing[0]}' is not supported by this CPU"):
        adam_step(**_good(simd=missing[0]))
