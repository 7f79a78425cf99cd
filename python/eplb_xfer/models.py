"""Per-expert weight shapes of the benchmark models (vLLM FusedMoE layout).

Each model is a list of :class:`~eplb_xfer._scenario.TensorSpec`, one per
stacked weight tensor of an MoE layer, giving the dtype and the shape of one
expert's row. FP8 and MXFP4 weights (and e8m0 scales) are stored as ``uint8``,
exactly as the engine holds them. :func:`scaled` shrinks the rows for CPU
runs while keeping the tensor count, dtypes and shape ratios.

>>> MODELS["deepseek-v3"].expert_bytes
44050944
>>> scaled("qwen3-30b-a3b", 16).tensors[0].row_shape
(96, 128)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ._scenario import TensorSpec
from ._tensors import expert_bytes as _layer_expert_bytes

u8, bf16, f32 = torch.uint8, torch.bfloat16, torch.float32


@dataclass(frozen=True)
class ModelSpec:
    """The MoE expert geometry of one model.

    Attributes:
        name: short CLI name (``deepseek-v3``).
        title: human name with the quantization.
        num_experts: logical routed experts per MoE layer.
        num_moe_layers: MoE layers of the model.
        tensors: one :class:`TensorSpec` per stacked weight tensor (expert row).
        scale: row-dimension divisor applied by :func:`scaled` (1 = full size).
    """

    name: str
    title: str
    num_experts: int
    num_moe_layers: int
    tensors: tuple[TensorSpec, ...]
    scale: int = 1

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert summed over the layer's tensors.

        Computed by the library's own layout arithmetic
        (``eplb_xfer._tensors.expert_bytes``) on meta tensors, so it is the
        same number the communicators use (e.g. the staged send slot size).
        """
        meta = [torch.empty((1, *s.row_shape), dtype=s.dtype, device="meta") for s in self.tensors]
        return _layer_expert_bytes(meta)

    def layer_bytes(self, n_local: int) -> int:
        """Bytes of one layer's worth of ``n_local`` expert rows on one rank."""
        return n_local * self.expert_bytes

    def specs(self) -> list[TensorSpec]:
        """The tensor specs as a list (the form ``eplb_xfer._scenario`` takes)."""
        return list(self.tensors)


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec(
            "deepseek-v3",
            "DeepSeek-V3/R1 FP8 (H 7168, I 2048)",
            num_experts=256,
            num_moe_layers=58,
            tensors=(
                TensorSpec("w13", u8, (4096, 7168)),  # fp8 e4m3, stored as uint8
                TensorSpec("s13", f32, (32, 56)),  # 128x128 block scales
                TensorSpec("w2", u8, (7168, 2048)),
                TensorSpec("s2", f32, (56, 16)),
            ),
        ),
        ModelSpec(
            "qwen3-30b-a3b",
            "Qwen3-30B-A3B BF16 (H 2048, I 768)",
            num_experts=128,
            num_moe_layers=48,
            tensors=(
                TensorSpec("w13", bf16, (1536, 2048)),
                TensorSpec("w2", bf16, (2048, 768)),
            ),
        ),
        ModelSpec(
            "gpt-oss-120b",
            "gpt-oss-120b MXFP4 (H = I = 2880)",
            num_experts=128,
            num_moe_layers=36,
            tensors=(
                TensorSpec("w13", u8, (5760, 1440)),  # two fp4 values per byte
                TensorSpec("s13", u8, (5760, 90)),  # e8m0 scale per 32 values
                TensorSpec("b13", bf16, (5760,)),
                TensorSpec("w2", u8, (2880, 1440)),
                TensorSpec("s2", u8, (2880, 90)),
                TensorSpec("b2", bf16, (2880,)),
            ),
        ),
    )
}

#: Bytes per expert of each full-size model, as tabulated in CONTEXT.md.
EXPECTED_EXPERT_BYTES: dict[str, int] = {
    "deepseek-v3": 44_050_944,
    "qwen3-30b-a3b": 9_437_184,
    "gpt-oss-120b": 13_236_480,
}


def get_model(name: str | ModelSpec) -> ModelSpec:
    """The :class:`ModelSpec` called ``name`` (a ModelSpec passes through).

    Raises:
        ValueError naming the unknown model and the known ones.
    """
    if isinstance(name, ModelSpec):
        return name
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"model: unknown model {name!r}; known: {', '.join(MODELS)}") from None


def scaled(model: str | ModelSpec, scale: int) -> ModelSpec:
    """``model`` with every row dimension divided by ``scale`` (floor, min 1).

    The tensor count, names and dtypes are kept, as are the expert and layer
    counts; ``scale=1`` returns the full-size model.

    >>> [t.row_shape for t in scaled("deepseek-v3", 16).tensors]
    [(256, 448), (2, 3), (448, 128), (3, 1)]
    """
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale: expected an int >= 1, got {scale!r}")
    m = get_model(model)
    tensors = tuple(
        replace(s, row_shape=tuple(max(1, d // scale) for d in s.row_shape)) for s in m.tensors
    )
    return replace(m, tensors=tensors, scale=m.scale * scale)


def check_expert_bytes(names: Sequence[str] | None = None) -> dict[str, int]:
    """Asserts each full-size model's bytes per expert equal CONTEXT.md's table.

    Returns ``{name: bytes}``.

    >>> check_expert_bytes()
    {'deepseek-v3': 44050944, 'qwen3-30b-a3b': 9437184, 'gpt-oss-120b': 13236480}
    """
    out: dict[str, int] = {}
    for name in names if names is not None else list(MODELS):
        got = get_model(name).expert_bytes
        want = EXPECTED_EXPERT_BYTES[name]
        assert got == want, f"{name}: {got} bytes per expert, CONTEXT.md says {want}"
        out[name] = got
    return out
