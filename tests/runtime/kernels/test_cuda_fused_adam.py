"""The multi-tensor CUDA Adam: its kernel source compiles with nvcc (where nvcc exists), and on
a GPU its numbers match torch.optim.AdamW / Adam over lists of tensors of awkward sizes."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
import torch.utils.cpp_extension

from kernel_numerics import assert_matches_torch
from zeroplan.runtime.kernels import multi_tensor_adam_step
from zeroplan.runtime.kernels.adam_hyper import AdamHyper
from zeroplan.runtime.kernels.loader import CSRC_DIR


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_kernel_source_compiles_with_nvcc(tmp_path):
    includes = [f"-I{p}" for p in torch.utils.cpp_extension.include_paths()] + [f"-I{CSRC_DIR / 'cuda'}"]
    command = ["nvcc", "-c", "-std=c++17", "-O3", "--fmad=false", "-arch=sm_80", *includes,
               str(CSRC_DIR / "cuda" / "multi_tensor_adam_kernel.cu"), "-o", str(tmp_path / "kernel.o")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "kernel.o").stat().st_size > 0


# 40 tensors (more than the 24 addresses one launch carries) including one of 320+ chunks of
# 64 Ki elements, so tensors and chunks both carry over between launches; none a round size.
SIZES = [1, 7, 17, 65535, 65537, 1000003] + [4099 + 97 * i for i in range(33)] + [21_000_011]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam_l2"])
def test_matches_torch_optim_on_gpu(decoupled):
    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.randn(n, device="cuda", generator=gen) for n in SIZES]
    references = [p.clone().requires_grad_(True) for p in params]
    opt_cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    opt = opt_cls(references, lr=1e-2, weight_decay=0.1, foreach=False)
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    copies = [torch.empty_like(p, dtype=torch.bfloat16) for p in params]
    scale = 0.5
    for step in range(1, 101):
        grads = [torch.randn(n, device="cuda", generator=gen) for n in SIZES]
        for ref, grad in zip(references, grads):
            ref.grad = grad * scale
        opt.step()
        hyper = AdamHyper(step=step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                          decoupled=decoupled, grad_scale=scale)
        multi_tensor_adam_step(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                               hyper=hyper, bf16_outs=copies)
    for i, ref in enumerate(references):
        assert_matches_torch(params[i], ref.detach(), f"params[{i}]")
        assert_matches_torch(exp_avgs[i], opt.state[ref]["exp_avg"], f"exp_avgs[{i}]")
        assert_matches_torch(exp_avg_sqs[i], opt.state[ref]["exp_avg_sq"], f"exp_avg_sqs[{i}]")
        assert torch.equal(copies[i], params[i].to(torch.bfloat16)), f"bf16_outs[{i}]"
