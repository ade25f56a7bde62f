"""fastface.quantization: a transformer with int8 attention and expert weights. Its layers against literal per-token
oracles built from ``ops.int8.int8_linear_reference``, the whole model against the float model, dtype casts, the
state dict, the engine and the pipeline, and the refusals (training, an unknown weight format)."""

from __future__ import annotations

import copy

import pytest
import torch

import fastface
from fastface import ops
from fastface.config import GROUP_GENERATION, FaceConfig
from fastface.model import FaceTransformer
from fastface.ops.int8 import int8_linear_reference
from fastface.ops.moe import activate, route
from fastface.prompts import t2i_prompt_ids, t2i_sequence
from fastface.quantization import Int8Experts, Int8Linear, quantize_int8, weight_bytes

try:
    from fastface import _C
except ImportError:
    _C = None

needs_cpp = pytest.mark.skipif(_C is None, reason="fastface._C not built")
CFG = FaceConfig.from_name("tiny")


def tiny_model(config=CFG, seed=0):
    torch.manual_seed(seed)
    model = FaceTransformer(config).eval()
    model.reset_parameters(seed)
    return model


def t2i_batch(config, B=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, config.codebook_size, (B, config.image_tokens), generator=gen)
    texts = [torch.randint(9, config.text_vocab_size, (n,), generator=gen).tolist() for n in (3, 7, 5)][:B]
    ids = t2i_sequence(t2i_prompt_ids(texts, config), image + config.image_token_offset, config)
    return ids, torch.full((B,), GROUP_GENERATION, dtype=torch.long)


def int8_ffn(x, gate_up, down, activation="silu"):
    """One gated FFN with both matmuls in int8, from the float weights, by the reference."""
    gu = int8_linear_reference(x, ops.quantize_int8(gate_up))
    D = gu.shape[1] // 2
    return int8_linear_reference(activate(gu[:, :D], activation) * gu[:, D:], ops.quantize_int8(down))


def per_token_int8_moe(x, groups, moe):
    """The token-level MoE one token at a time: route in float, each chosen expert's FFN in int8, and the shared
    experts of the group as one FFN of their concatenated width (what they are in float)."""
    ys = []
    for t in range(x.shape[0]):
        g, xt = int(groups[t]), x[t : t + 1]
        weights, experts = route(xt.float() @ moe.router_weight[g].float().t(), moe.config.top_k,
                                 moe.config.normalize_topk)
        yt = torch.zeros_like(xt)
        if moe.shared_gate_up_proj is not None:
            gu, down = moe.shared_gate_up_proj[g], moe.shared_down_proj[g]  # [S, 2Fs, H], [S, H, Fs]
            Fs = gu.shape[1] // 2
            w1 = torch.cat([gu[:, :Fs].reshape(-1, gu.shape[2]), gu[:, Fs:].reshape(-1, gu.shape[2])])
            yt = yt + int8_ffn(xt, w1, torch.cat(list(down), dim=1))
        for k in range(moe.config.top_k):
            e = int(experts[0, k])
            yt = yt + weights[0, k] * int8_ffn(xt, moe.gate_up_proj[g, e], moe.down_proj[g, e])
        ys.append(yt)
    return torch.cat(ys)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("shared", [1, 2, 0])
def test_int8_experts_match_the_per_token_oracle(backend, shared):
    config = FaceConfig.from_name("tiny", num_shared_experts=shared, hidden_size=40, expert_ffn_size=28,
                                  shared_ffn_size=20)
    moe = tiny_model(config, seed=shared).layers[0].moe
    T = 37
    x = torch.randn(T, config.hidden_size)
    groups = torch.randint(0, moe.router_weight.shape[0], (T,))
    experts8 = Int8Experts(moe)
    experts8.backend = backend
    with torch.no_grad():
        got, logits = experts8(x, groups, moe.router_weight, top_k=config.top_k,
                               normalize_topk=config.normalize_topk, return_router_logits=True)
        want = per_token_int8_moe(x, groups, moe)
    # each matmul's bits are the oracle's; only the order of adding the top-k and shared outputs differs
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits, torch.einsum("th,teh->te", x, moe.router_weight[groups]), atol=1e-5, rtol=1e-5)


@needs_cpp
def test_int8_linear_layer_backends_agree_bitwise_and_keep_the_bias():
    linear = torch.nn.Linear(45, 19)
    layer = Int8Linear(linear)
    x = torch.randn(2, 11, 45)
    outs = {}
    for backend in ("reference", "cpp"):
        layer.backend = backend
        with torch.no_grad():
            outs[backend] = layer(x)
    assert torch.equal(outs["reference"], outs["cpp"])
    want = int8_linear_reference(x, ops.quantize_int8(linear.weight.detach()), linear.bias.detach())
    assert torch.equal(outs["cpp"], want)


def model_error(model, q, ids, task):
    with torch.no_grad():
        a, b = model(ids, task).logits, q(ids, task).logits
    return ((a - b).norm() / a.norm()).item()


@pytest.mark.parametrize("preset", ["tiny", "face-s"])
def test_quantized_model_logits_stay_close_to_the_float_model(preset):
    """8-bit weights and activations in every attention and expert matmul: the logits move by a few percent."""
    config = FaceConfig.from_name(preset)
    model = tiny_model(config)
    q = copy.deepcopy(model)
    quantize_int8(q)
    ids, task = t2i_batch(config)
    err = model_error(model, q, ids, task)
    assert 1e-4 < err < 0.02, err  # not the float model (it did change), and not far from it


def test_dense_mlp_blocks_are_quantized_too():
    config = FaceConfig.from_name("tiny", mlp="dense", block="parallel", bias=True, seq_moe=False)
    model = tiny_model(config)
    q = copy.deepcopy(model)
    quantize_int8(q)
    names = [n for n, c in model.layers[0].mlp.named_children() if isinstance(c, torch.nn.Linear)]
    assert len(names) >= 2 and all(isinstance(getattr(q.layers[0].mlp, n), Int8Linear) for n in names)
    ids, task = t2i_batch(config)
    assert 1e-4 < model_error(model, q, ids, task) < 0.02


def test_quantize_replaces_float_weights_and_shrinks_the_model():
    model = tiny_model(FaceConfig.from_name("face-s"))
    before = weight_bytes(model)["total"]
    version = model.weights_version()
    quantize_int8(model)
    layer = model.layers[0]
    assert isinstance(layer.attn.qkv, Int8Linear) and isinstance(layer.attn.out, Int8Linear)
    assert layer.moe.gate_up_proj is None and layer.moe.experts8 is not None
    assert model.weight_format == "int8" and model.weights_version() != version
    sizes = weight_bytes(model)
    assert sizes["total"] < 0.4 * before and sizes["int8_layers"] > 0
    keys = model.state_dict().keys()
    assert "layers.0.attn.qkv.weight_packed" in keys and "layers.0.moe.experts8.gate_up_scale" in keys
    assert not any(k.endswith("moe.gate_up_proj") for k in keys)
    state = copy.deepcopy(model.state_dict())
    quantize_int8(model)  # a second call does nothing
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_dtype_cast_keeps_int8_values_and_float32_scales_exact():
    model = tiny_model()
    quantize_int8(model)
    qkv = model.layers[0].attn.qkv
    scale, packed, bias = qkv.weight_scale.clone(), qkv.weight_packed.clone(), qkv.bias
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert qkv.weight_scale.dtype == torch.float32 and torch.equal(qkv.weight_scale, scale)
    assert torch.equal(qkv.weight_packed, packed)
    if bias is not None:
        assert qkv.bias.dtype == torch.float32
    ids, task = t2i_batch(CFG)
    with torch.no_grad():
        logits = model(ids, task).logits
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())


def test_a_quantized_model_refuses_to_train():
    model = tiny_model()
    quantize_int8(model)
    ids, task = t2i_batch(CFG)
    with pytest.raises(ValueError, match="forward only"):
        model(ids, task)


def test_engine_generates_with_int8_weights_on_both_backends(tiny_checkpoint):
    pipes = {b: fastface.load(tiny_checkpoint, backend=b, weights="int8") for b in ("reference", "auto")}
    float_pipe = fastface.load(tiny_checkpoint, backend="reference")
    assert pipes["auto"].model.weight_format == "int8" and float_pipe.model.weight_format == "float"
    prompts = ["w1 w2", "w3 qqq"]
    tokens = {b: p.generate_tokens(prompts, steps=4, seed=3) for b, p in pipes.items()}
    for t in tokens.values():
        assert t.shape == (2, CFG.image_tokens) and int(t.min()) >= 0 and int(t.max()) < CFG.codebook_size
    assert float(pipes["reference"].model.layers[0].attn.qkv.weight_scale.min()) > 0
    # the two backends run the same int8 products bitwise; attention and norms differ in float rounding only
    agree = (tokens["reference"] == tokens["auto"]).float().mean().item()
    assert agree > 0.9, agree
    text = pipes["auto"].answer(torch.zeros(1, CFG.image_tokens, dtype=torch.long), ["w1 w2"])
    assert isinstance(text[0], str)


@pytest.mark.parametrize("dense", [False, True])
def test_int8_layers_take_each_calls_backend(monkeypatch, dense):
    """The engine passes its backend per call, as to attention and the MoE: a quantised copy of a model a reference
    loop once ran (which leaves "reference" on its modules) still runs ``auto`` under an auto decoder, and the
    reference under a reference one."""
    from fastface import quantization
    from fastface.decoding import Decoder
    from fastface.prompts import t2i_prompt_ids

    config = FaceConfig.from_name("tiny", mlp="dense", block="parallel", seq_moe=False) if dense else CFG
    model = tiny_model(config)
    model.set_backend("reference")
    quantize_int8(model)
    seen = []
    real = quantization.ops.int8_linear
    monkeypatch.setattr(quantization.ops, "int8_linear",
                        lambda *a, backend, **k: seen.append(backend) or real(*a, backend=backend, **k))
    ids = t2i_prompt_ids([[9, 10, 11]], config)
    for backend in ("auto", "reference"):
        seen.clear()
        Decoder(model, backend).image_tokens(ids, steps=2, guidance=1.0, seeds=[0])
        assert seen and set(seen) == {backend}, (backend, set(seen))


def test_load_rejects_an_unknown_weight_format(tiny_checkpoint):
    with pytest.raises(ValueError, match="weights"):
        fastface.load(tiny_checkpoint, weights="int4")


def test_int8_and_bfloat16_compose(tiny_checkpoint):
    pipe = fastface.load(tiny_checkpoint, backend="auto", dtype="bfloat16", weights="int8")
    tokens = pipe.generate_tokens(["w1"], steps=3, seed=0)
    assert tokens.shape == (1, CFG.image_tokens)
    assert pipe.model.layers[0].attn.qkv.weight_scale.dtype == torch.float32
