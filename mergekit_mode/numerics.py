"""Fast checks on tensor values that run on every streamed tensor.

`torch.isfinite` on a CPU bfloat16 tensor runs at about 90M elements/s here, slower than reading
the bytes from disk. A float is NaN or Inf exactly when its exponent bits are all ones, so on the
CPU the check is one vectorised numpy AND and max over the raw bits (about 20x faster).
"""

from __future__ import annotations

import numpy as np
import torch

# dtype -> (unsigned view, mask without the sign bit, smallest non-finite pattern)
_BITS = {
    torch.bfloat16: (np.uint16, 0x7FFF, 0x7F80),
    torch.float16: (np.uint16, 0x7FFF, 0x7C00),
    torch.float32: (np.uint32, 0x7FFFFFFF, 0x7F800000),
    torch.float64: (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}
_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 22  # elements per pass: the scratch buffer stays at a few MB


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or +-Inf (non-float tensors are always finite)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if tensor.device.type != "cpu" or tensor.dtype not in _BITS:
        return bool(torch.isfinite(tensor).all())
    unsigned, mask, threshold = _BITS[tensor.dtype]
    raw = tensor.contiguous().view(_INT_OF_SIZE[tensor.element_size()]).numpy().view(unsigned).reshape(-1)
    scratch = np.empty(min(raw.size, _CHUNK), dtype=unsigned)  # bounded: not a copy of a 1 GB embedding
    for start in range(0, raw.size, _CHUNK):
        part = raw[start : start + _CHUNK]
        np.bitwise_and(part, unsigned(mask), out=scratch[: part.size])
        if int(scratch[: part.size].max()) >= threshold:
            return False
    return True
