"""Weight-only quantisation of a model's linear layers: fewer weight bytes read per token.

Decoding one token reads every weight once, so on a CPU its speed is bound by the bytes the
weights take: bfloat16 reads 2 bytes a weight, ``int8`` 1 (+ one scale per output row), ``int4``
half a byte (+ a scale and an offset per group of 32 inputs). Activations stay in the model's
dtype; only the matrix products read quantised weights, through torch's packed CPU kernels
(``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``; both run on AVX2). Embeddings,
norms and biases are left as they are (read one row per token, or tiny).

The quantisers are pure tensor functions with a dequantising reference beside each, so the
kernels are tested against plain ``dequantised @ x`` on literal inputs. What each scheme costs
in quality is measured, not assumed: ``slmgate bench decode`` reports the perplexity of every
arm on a fixed text next to its speed (BENCHMARKS.md, "Single-stream decode").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "INT4_GROUP",
    "QUANTIZATIONS",
    "Int4Linear",
    "Int4Weight",
    "Int8Linear",
    "Int8Weight",
    "Quantization",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
]  # fmt: skip

Quantization = Literal["none", "int8", "int4"]
QUANTIZATIONS: tuple[Quantization, ...] = ("none", "int8", "int4")

# Inputs per int4 group (one scale and offset each): the grouping of llama.cpp's Q4 formats.
INT4_GROUP = 32
# torch's int4 CPU packing takes the "inner k tiles" of its CUDA sibling; on CPU it only checks it.
_INT4_INNER_K_TILES = 8
# torch's int4 CPU packing takes output rows in blocks of this many.
_INT4_ROW_BLOCK = 16


@dataclass(frozen=True, slots=True)
class Int8Weight:
    """Symmetric per-output-row int8: ``weight ≈ values * scales[:, None]``."""

    values: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out], the activations' dtype

    def dequantize(self) -> torch.Tensor:
        return self.values.float() * self.scales.float()[:, None]


@dataclass(frozen=True, slots=True)
class Int4Weight:
    """Asymmetric int4 per group of ``INT4_GROUP`` inputs: ``weight ≈ codes * scale + low``
    with codes 0..15 (``codes`` unpacked, for reference and tests)."""

    codes: torch.Tensor  # [out, in] int32 in 0..15
    scales: torch.Tensor  # [out, in / group] float32
    lows: torch.Tensor  # [out, in / group] float32

    def dequantize(self) -> torch.Tensor:
        out, inputs = self.codes.shape
        groups = self.codes.float().reshape(out, inputs // INT4_GROUP, INT4_GROUP)
        values = groups * self.scales[..., None] + self.lows[..., None]
        return values.reshape(out, inputs)


def quantize_int8(weight: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
    """Round each output row to int8 with the scale that maps its largest magnitude to 127."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    values = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(values.contiguous(), scales.to(dtype))


def quantize_int4(weight: torch.Tensor) -> Int4Weight:
    """Round each group of ``INT4_GROUP`` inputs of a row onto 16 levels spanning its min..max."""
    w = weight.float()
    out, inputs = w.shape
    if inputs % INT4_GROUP:
        raise ValueError(f"int4 needs in_features divisible by {INT4_GROUP}, got {inputs}")
    groups = w.reshape(out, inputs // INT4_GROUP, INT4_GROUP)
    lows, highs = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((highs - lows) / 15.0).clamp(min=1e-12)
    codes = torch.round((groups - lows[..., None]) / scales[..., None]).clamp(0, 15)
    return Int4Weight(codes.to(torch.int32).reshape(out, inputs), scales, lows)


class Int8Linear(torch.nn.Module):
    """A ``Linear`` whose weight is int8 (``Int8Weight``); the bias stays in the model's dtype."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        q = quantize_int8(linear.weight.detach(), dtype)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("values", q.values)
        self.register_buffer("scales", q.scales)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.aten._weight_int8pack_mm(flat, self.values, self.scales)
        out = out.reshape(*x.shape[:-1], self.out_features)
        result: torch.Tensor = out + self.bias if self.bias is not None else out
        return result


class Int4Linear(torch.nn.Module):
    """A ``Linear`` whose weight is packed int4 (``Int4Weight``, torch's CPU int4 layout)."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype) -> None:
        super().__init__()
        q = quantize_int4(linear.weight.detach())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.codes, _INT4_INNER_K_TILES)
        # The kernel computes (code - 8) * scale + zero: zero = low + 8 * scale gives the same.
        zeros = q.lows + 8 * q.scales
        scale_zero = torch.stack([q.scales, zeros], dim=-1).transpose(0, 1).contiguous()
        self.register_buffer("packed", packed)
        # [in / group, out, 2] in the activations' dtype (the kernel takes them so)
        self.register_buffer("scale_zero", scale_zero.to(dtype))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            flat, self.packed, INT4_GROUP, self.scale_zero
        )
        out = out.reshape(*x.shape[:-1], self.out_features)
        result: torch.Tensor = out + self.bias if self.bias is not None else out
        return result


def quantize_model(model: torch.nn.Module, scheme: Quantization) -> int:
    """Replace every ``nn.Linear`` of ``model`` (the output head included, untied from the
    embeddings when they share a tensor) by its ``scheme`` twin, in place; returns how many.
    A layer whose shape the int4 kernel cannot take (inputs not in whole groups, outputs not
    in blocks of 16) stays as it is."""
    if scheme == "none":
        return 0
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {scheme!r}")
    dtype = next(model.parameters()).dtype
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and _fits(module, scheme)]  # fmt: skip
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        twin = Int8Linear(linear, dtype) if scheme == "int8" else Int4Linear(linear, dtype)
        setattr(parent, child, twin)
    # The output head was its own module now; transformers must not re-tie it to the embeddings.
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    return len(targets)


def _fits(linear: torch.nn.Linear, scheme: Quantization) -> bool:
    if scheme == "int4":
        return linear.in_features % INT4_GROUP == 0 and linear.out_features % _INT4_ROW_BLOCK == 0
    return True
