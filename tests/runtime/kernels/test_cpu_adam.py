"""cpu_adam against torch.optim.AdamW / Adam: every SIMD path, thread count and odd length."""

from __future__ import annotations

import pytest
import torch

from kernel_numerics import assert_matches_torch
from zeroplan.runtime.kernels import adam_step, cpu_simd_paths

pytestmark = pytest.mark.numerics  # rerun under another vector unit (Makefile: test-capability)

LENGTHS = (1, 7, 17, 1000003)  # none a multiple of the 8- or 16-lane vector width
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _state(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"param": torch.randn(n, generator=gen), "exp_avg": torch.zeros(n), "exp_avg_sq": torch.zeros(n)}


def _variants(cpu_adam_ext) -> list[tuple[str, int]]:
    return [(simd, threads) for simd in cpu_simd_paths() for threads in (1, 2)]


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam_l2"])
def test_matches_torch_optim_over_100_steps(cpu_adam_ext, n, decoupled):
    """All paths and thread counts step in lockstep with torch.optim on the same gradients;
    they must agree with torch within tolerance and with each other bit for bit."""
    gen = torch.Generator().manual_seed(n)
    start = _state(n, gen)
    reference = start["param"].clone().requires_grad_(True)
    opt_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = opt_cls([reference], lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                  eps=HYPER["eps"], weight_decay=HYPER["weight_decay"])
    ours = {v: {k: t.clone() for k, t in start.items()} for v in _variants(cpu_adam_ext)}
    copies = {v: torch.empty(n, dtype=torch.bfloat16) for v in ours}
    for step in range(1, 101):
        grad = torch.randn(n, generator=gen)
        reference.grad = grad.clone()
        opt.step()
        for (simd, threads), state in ours.items():
            adam_step(**state, grad=grad, step=step, decoupled=decoupled, bf16_out=copies[(simd, threads)],
                      kernel="cpu_adam", simd=simd, threads=threads, **HYPER)
    torch_state = opt.state[reference]
    first = next(iter(ours.values()))
    assert_matches_torch(first["param"], reference.detach(), "param")
    assert_matches_torch(first["exp_avg"], torch_state["exp_avg"], "exp_avg")
    assert_matches_torch(first["exp_avg_sq"], torch_state["exp_avg_sq"], "exp_avg_sq")
    for variant, state in ours.items():
        for key in state:
            assert torch.equal(state[key], first[key]), f"{variant} differs from {next(iter(ours))} in {key}"
        assert torch.equal(copies[variant], state["param"].to(torch.bfloat16)), f"bf16 copy of {variant}"


@pytest.mark.parametrize("simd", ["avx512", "avx2", "scalar"])
def test_each_simd_path_equals_scalar_bitwise(cpu_adam_ext, simd):
    if simd not in cpu_simd_paths():
        pytest.skip(f"this CPU has no {simd} (it runs {', '.join(cpu_simd_paths())})")
    gen = torch.Generator().manual_seed(7)
    n = 4099
    start = _state(n, gen)
    forced, scalar = ({k: t.clone() for k, t in start.items()} for _ in range(2))
    for step in range(1, 11):
        grad = torch.randn(n, generator=gen)
        for state, path in ((forced, simd), (scalar, "scalar")):
            adam_step(**state, grad=grad, step=step, decoupled=True, kernel="cpu_adam", simd=path, **HYPER)
    for key in start:
        assert torch.equal(forced[key], scalar[key]), key


@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam_l2"])
def test_grad_scale_premultiplies_the_gradient(cpu_adam_ext, decoupled):
    """grad_scale=s gives the step torch.optim takes on the gradient s * grad; grad is untouched."""
    gen = torch.Generator().manual_seed(3)
    n, scale = 1031, 0.37 / 1024.0  # a clip coefficient over a loss scale
    start = _state(n, gen)
    reference = start["param"].clone().requires_grad_(True)
    opt_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = opt_cls([reference], lr=1e-3, weight_decay=0.01)
    ours = {k: t.clone() for k, t in start.items()}
    for step in range(1, 21):
        grad = torch.randn(n, generator=gen) * 1024.0
        reference.grad = grad * scale
        opt.step()
        before = grad.clone()
        adam_step(**ours, grad=grad, step=step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=0.01, decoupled=decoupled, grad_scale=scale, kernel="cpu_adam")
        assert torch.equal(grad, before)
    assert_matches_torch(ours["param"], reference.detach(), "param")
    assert_matches_torch(ours["exp_avg"], opt.state[reference]["exp_avg"], "exp_avg")


@pytest.mark.parametrize("simd", ["avx2", "scalar"])
def test_without_bias_correction_matches_float64_formula(cpu_adam_ext, simd):
    """bias_correction=False (DeepSpeed's option): m, v as in Adam, step lr * m / (sqrt(v) + eps)."""
    gen = torch.Generator().manual_seed(5)
    n, lr, b1, b2, eps, wd = 67, 1e-2, 0.9, 0.99, 1e-6, 0.05
    p64 = torch.randn(n, generator=gen, dtype=torch.float64)
    m64, v64 = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    ours = {"param": p64.float(), "exp_avg": torch.zeros(n), "exp_avg_sq": torch.zeros(n)}
    for step in range(1, 31):
        grad = torch.randn(n, generator=gen)
        p64 = p64 * (1 - lr * wd)
        m64 = b1 * m64 + (1 - b1) * grad.double()
        v64 = b2 * v64 + (1 - b2) * grad.double() ** 2
        p64 = p64 - lr * m64 / (v64.sqrt() + eps)
        adam_step(**ours, grad=grad, step=step, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd,
                  decoupled=True, bias_correction=False, kernel="cpu_adam",
                  simd=simd if simd in cpu_simd_paths() else "scalar")
    torch.testing.assert_close(ours["param"], p64.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["exp_avg_sq"], v64.float(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("simd", ["avx512", "avx2", "scalar"])
def test_bf16_copy_rounds_to_nearest_even_like_torch(cpu_adam_ext, simd):
    """lr=0 and a zero gradient leave param as given, so the copy of chosen bit patterns is
    checked against torch's .to(torch.bfloat16): ties both ways, the largest float (rounds to
    inf), denormals, infinities, signed zeros and NaN, across vector lanes and the scalar tail."""
    if simd not in cpu_simd_paths():
        pytest.skip(f"this CPU has no {simd}")
    bits = [0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F807FFF, 0x7F7FFFFF, 0x00000001, 0x00018000,
            0x80008000, 0x7F800000, 0xFF800000, 0x00000000, 0x80000000, 0x7FC00001, 0xFFFFFFFF]
    patterns = torch.tensor(bits * 3, dtype=torch.int64).to(torch.int32).view(torch.float32)
    param = patterns.clone()
    n = param.numel()
    out = torch.empty(n, dtype=torch.bfloat16)
    adam_step(param=param, grad=torch.zeros(n), exp_avg=torch.zeros(n), exp_avg_sq=torch.zeros(n),
              step=1, lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
              bf16_out=out, kernel="cpu_adam", simd=simd)
    assert torch.equal(param.view(torch.int32), patterns.view(torch.int32))
    expected = patterns.to(torch.bfloat16).view(torch.int16)
    finite = ~torch.isnan(patterns)
    assert torch.equal(out.view(torch.int16)[finite], expected[finite])
    assert torch.isnan(out[~finite].float()).all()
