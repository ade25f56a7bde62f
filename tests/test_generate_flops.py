"""``benchmark.generate_flops`` (the engine's matmul work of one generation) against torch's own FLOP counter.

torch.utils.flop_counter.FlopCounterMode counts the aten matmuls the torch backend runs (linear layers, the
sorted MoE's expert matmuls, the LM head); the C++ attention it cannot see, so the counted matmuls are compared
with every part but ``attention``, exactly.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastface.benchmark import _generate, generate_flops, prompt_ids
from fastface.config import FaceConfig
from fastface.model import FaceTransformer


def counted_mm(model, ids, steps, guidance, seeds):
    counter = FlopCounterMode(display=False)
    with counter:
        _generate(model, "torch", ids, steps, guidance, seeds)
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if str(op) in ("aten.mm", "aten.addmm"))


@pytest.mark.filterwarnings("ignore:fastface. backend 'torch' is not available")
@pytest.mark.parametrize("overrides", [{}, {"num_shared_experts": 0, "top_k": 1, "expert_ffn_size": 40},
                                       {"mlp": "dense", "dense_ffn_size": 72, "seq_moe": False},
                                       {"mlp": "dense", "mlp_activation": "gelu_tanh", "block": "parallel",
                                        "bias": True, "seq_moe": False}])
@pytest.mark.parametrize("batch,steps,guidance", [(2, 3, 2.0), (3, 4, 0.0), (1, 1, 1.5)])
def test_generate_flops_match_torch_flop_counter(overrides, batch, steps, guidance):
    cfg = FaceConfig(**{**FaceConfig.from_name("tiny").to_dict(), "image_grid": 5, **overrides})
    torch.manual_seed(0)
    model = FaceTransformer(cfg).eval()
    ids, seeds = prompt_ids(cfg, batch), list(range(batch))
    _generate(model, "torch", ids, 1, guidance, seeds)  # warm: the unconditional prefix is cached per model
    parts = generate_flops(cfg, batch, steps, guidance)
    assert counted_mm(model, ids, steps, guidance, seeds) == parts["total"] - parts["attention"]
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert parts["attention"] > 0 and parts["head"] > 0


def test_generate_flops_scale_with_the_work():
    cfg = FaceConfig.from_name("face-s")
    one, two = generate_flops(cfg, 1, 16, 2.0), generate_flops(cfg, 2, 16, 2.0)
    assert two["projections"] == 2 * one["projections"] and two["head"] == 2 * one["head"]
    unguided = generate_flops(cfg, 1, 16, 0.0)
    assert 2 * unguided["mlp"] == one["mlp"] and unguided["prefill"] == one["prefill"]
    assert generate_flops(cfg, 1, 1, 2.0)["head"] == 2 * cfg.image_tokens * 2 * cfg.hidden_size * cfg.codebook_size
