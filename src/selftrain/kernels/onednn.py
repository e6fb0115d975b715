"""fp32 linear layers and LLaMA-style MLPs through oneDNN on weights reordered once (CPU only),
swapped in for the duration of a `packed_linears` context and restored after it."""
from __future__ import annotations

from contextlib import contextmanager

import torch

# Linear layers with at least this many weights run packed (`packed_linears`): oneDNN on a
# reordered weight beat MKL's sgemm on the plain one down to 576x192 (SmolLM2's key and value
# projections); below that nothing was measured (docs/performance.md).
PACK_MIN_WEIGHTS = 576 * 192


def _packable(m) -> bool:
    return (type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
            and m.weight.numel() >= PACK_MIN_WEIGHTS)


class _PackedLinear(torch.nn.Module):
    """An fp32 linear layer through oneDNN on a weight reordered once, dense in and dense out
    (`torch.utils.mkldnn.MkldnnLinear` converts its input to oneDNN's layout and its output back
    on every call, which cost more than the packing saved on small projections)."""

    def __init__(self, linear: torch.nn.Linear, rows: int):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x, attr: str = "none"):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, attr, [], "")


def _gated_mlp(mlp) -> bool:
    """A LLaMA-style MLP, down(silu(gate(x)) * up(x)), with all three layers packable."""
    act = getattr(mlp, "act_fn", None)
    return (all(_packable(getattr(mlp, k, None)) for k in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"))


def _fused_mlp_forward(gate: _PackedLinear, up: _PackedLinear, down: _PackedLinear):
    """down(silu(gate(x)) * up(x)) with the SiLU and the product done inside oneDNN's matmuls."""
    def forward(x):
        a = gate(x, "swish")
        h = torch.ops.mkldnn._linear_pointwise.binary(x, a, up.packed, up.bias, "mul")
        return down(h)
    return forward


@contextmanager
def packed_linears(model, rows: int = 128):
    """On CPU, while inside: every plain fp32 `nn.Linear` of at least PACK_MIN_WEIGHTS weights runs
    through oneDNN on a weight reordered once for about `rows` rows (`_PackedLinear`), and a
    LLaMA-style MLP (gate, up and down projections, SiLU) runs as three such matmuls with the SiLU
    and the gate's product fused into the first two. Outputs agree to ~3e-6. The reordered copies
    cost their size in memory while inside (~540 MB for SmolLM2-135M, every layer reordered).
    Layers on other devices or dtypes, and wrapped layers (LoRA), are left as they are; nesting is
    harmless (an inner context finds nothing left to pack). Fused beat packed-but-unfused, which
    beat `MkldnnLinear` and plain layers (docs/performance.md)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        yield
        return
    swapped, fused = [], []
    for parent in list(model.modules()):
        if _gated_mlp(parent):
            if "forward" not in vars(parent):  # else an outer packed_linears fused it already
                parent.forward = _fused_mlp_forward(*(_PackedLinear(getattr(parent, k), rows)
                                                      for k in ("gate_proj", "up_proj", "down_proj")))
                fused.append(parent)
            continue
        for name, child in list(parent.named_children()):
            if _packable(child):
                setattr(parent, name, _PackedLinear(child, rows))
                swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent in fused:
            del parent.forward
        for parent, name, child in swapped:
            setattr(parent, name, child)
