"""The bit-level NaN/Inf check agrees with torch.isfinite, across dtypes and chunk boundaries."""

from __future__ import annotations

import pytest
import torch

from mergekit_mode import numerics


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_all_finite_agrees_with_torch(monkeypatch, dtype, chunk):
    monkeypatch.setattr(numerics, "_CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(100, 7, generator=gen) * 1000).to(dtype)
    extremes = base.clone()
    extremes[0, :2] = torch.tensor([torch.finfo(dtype).max, -torch.finfo(dtype).max]).to(dtype)
    extremes[1, 0] = torch.finfo(dtype).tiny
    cases = [base, extremes, torch.empty(0, dtype=dtype)]
    for bad in (float("nan"), float("inf"), -float("inf")):
        for pos in ((0, 0), (3, 4), (99, 6)):
            spoiled = base.clone()
            spoiled[pos] = bad
            cases.append(spoiled)
    for tensor in cases:
        assert numerics.all_finite(tensor) == bool(torch.isfinite(tensor).all())
