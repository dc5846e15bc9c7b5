"""Tolerance of the kernel tests against torch.optim."""

from __future__ import annotations

import torch


def assert_matches_torch(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Within 1e-6 relative of torch.optim, elementwise, with an absolute floor of 1e-6 of the
    tensor's largest magnitude.

    Why the floor: torch's CPU sqrt goes through MKL's vsSqrt, which is not correctly rounded
    (1 ulp off for ~15% of inputs), while ours is IEEE sqrt; everything else follows torch's
    operation order exactly. A 1-ulp denominator moves an update by lr * 2^-23, harmless in
    absolute terms but unbounded relative to a parameter that happens to be near zero.
    """
    floor = 1e-6 * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=floor, msg=lambda m: f"{name}: {m}")
