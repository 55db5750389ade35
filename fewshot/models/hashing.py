"""Keys of tensor contents, computed where the tensors are (no host round trip) and the same on
every device: what makes Meta-LSTM's mini-batch order and ResNet-12's DropBlock masks functions
of the images alone, so that a recomputation, a vmap and a resumed run see the very same ones."""

from __future__ import annotations

import torch
from torch import Tensor


def _as_int64(constant: int) -> int:
    """A 64-bit constant as the signed value an int64 tensor holds."""
    return constant - (1 << 64) if constant >= 1 << 63 else constant


# SplitMix64's finaliser (Steele et al., "Fast splittable pseudorandom number generators",
# OOPSLA 2014): int64 tensor arithmetic wraps the same way on every device.
_MIX = (_as_int64(0xBF58476D1CE4E5B9), _as_int64(0x94D049BB133111EB))


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """A logical right shift of int64 values (torch's `>>` is arithmetic)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix(z: Tensor) -> Tensor:
    """Scramble int64 values into well-spread ones, elementwise, on their device."""
    z = (z ^ _shift_right(z, 30)) * _MIX[0]
    z = (z ^ _shift_right(z, 27)) * _MIX[1]
    return z ^ _shift_right(z, 31)


def content_key(x: Tensor) -> Tensor:
    """A [] int64 key of images in [0, 1], computed where they are, without a host round trip:
    the same images in the same order give it on any device (integer sums wrap, in any order,
    to the same value)."""
    pixels = (x.detach().flatten() * 255).round().to(torch.int64)
    positions = mix(torch.arange(len(pixels), device=x.device))
    return mix((pixels + 1) * positions).sum()
