"""Weight-only quantisation (decoding.quant): the quantisers round as documented, the packed
CPU kernels compute ``x @ dequantised.T`` exactly as the reference does, and a model's linear
layers are swapped in place (the output head untied from the embeddings)."""

from __future__ import annotations

import pytest
import torch

from decoding.models import ModelSpec
from decoding.quant import (
    INT4_GROUP,
    Int4Linear,
    Int8Linear,
    quantize_int4,
    quantize_int8,
    quantize_model,
)


def test_int8_rounds_each_row_to_its_own_scale() -> None:
    weight = torch.tensor([[0.5, -1.0, 0.25], [2.0, 1.0, -0.5]])
    q = quantize_int8(weight, torch.float32)
    assert q.scales.tolist() == pytest.approx([1.0 / 127, 2.0 / 127])
    assert q.values.tolist() == [[64, -127, 32], [127, 64, -32]]
    assert torch.allclose(q.dequantize(), weight, atol=0.5 * 2.0 / 127)


def test_int4_maps_each_group_min_max_onto_16_levels() -> None:
    row = torch.arange(INT4_GROUP, dtype=torch.float32)  # 0..31: step 31/15 per level
    weight = torch.stack([row, -row])
    q = quantize_int4(weight)
    assert q.lows.tolist() == [[0.0], [-31.0]]
    assert q.scales.flatten().tolist() == pytest.approx([31 / 15, 31 / 15])
    assert q.codes[0, 0] == 0
    assert q.codes[0, -1] == 15
    assert q.codes[1, 0] == 15
    assert (q.dequantize() - weight).abs().max() <= 31 / 15 / 2 + 1e-5


def test_int4_needs_whole_groups() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_int4(torch.zeros(4, 48))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_kernels_equal_the_dequantised_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=True).to(dtype)
    x = torch.randn(5, 128).to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    q8 = quantize_int8(linear.weight, dtype)
    expected8 = x.float() @ q8.dequantize().T + linear.bias.float()
    got8 = Int8Linear(linear, dtype)(x).float()
    assert (got8 - expected8).abs().max() <= tolerance * expected8.abs().max()
    q4 = quantize_int4(linear.weight)
    expected4 = x.float() @ q4.dequantize().T + linear.bias.float()
    got4 = Int4Linear(linear, dtype)(x).float()
    assert (got4 - expected4).abs().max() <= tolerance * expected4.abs().max()
    assert got4.shape == got8.shape == (5, 96)


def test_kernels_keep_leading_dimensions() -> None:
    linear = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(2, 3, 64)
    assert Int8Linear(linear, torch.float32)(x).shape == (2, 3, 32)
    assert Int4Linear(linear, torch.float32)(x).shape == (2, 3, 32)


class _Tiny(torch.nn.Module):
    """Embedding + one block + a head tied to the embedding, like the built-ins."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(48, 64)
        self.block = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.SiLU())
        self.head = torch.nn.Linear(64, 48, bias=False)
        self.head.weight = self.embed.weight
        self.config = type("Config", (), {"tie_word_embeddings": True})()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.block(self.embed(ids)))
        return out


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_model_swaps_every_linear_and_unties_the_head(scheme: str) -> None:
    torch.manual_seed(1)
    model = _Tiny()
    ids = torch.tensor([[1, 2, 3]])
    dense = model(ids)
    embedding_before = model.embed.weight.detach().clone()
    assert quantize_model(model, scheme) == 2  # type: ignore[arg-type]
    twin = Int8Linear if scheme == "int8" else Int4Linear
    assert isinstance(model.block[0], twin)
    assert isinstance(model.head, twin)
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.embed.weight, embedding_before)  # the embedding stays dense
    quantised = model(ids)
    relative = (quantised - dense).norm() / dense.norm()
    assert 0 < relative < (0.02 if scheme == "int8" else 0.15)


def test_int4_leaves_layers_its_kernel_cannot_take() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.Linear(40, 32))
    assert quantize_model(model, "int4") == 0  # 40 outputs, then 40 inputs: both stay dense
    assert all(isinstance(m, torch.nn.Linear) for m in model)
    assert quantize_model(model, "int8") == 2


def test_quantize_none_changes_nothing() -> None:
    model = _Tiny()
    assert quantize_model(model, "none") == 0
    assert isinstance(model.head, torch.nn.Linear)


def test_model_spec_checks_the_quantization_setting() -> None:
    source = "builtin:smollm2-135m-instruct"
    assert ModelSpec("m", source, quantization="int4", device="cpu").quantization == "int4"
    with pytest.raises(ValueError, match="quantization must be one of none, int8, int4"):
        ModelSpec("m", source, quantization="int3")
    with pytest.raises(ValueError, match="CPU kernels"):
        ModelSpec("m", source, quantization="int8", device="cuda")
