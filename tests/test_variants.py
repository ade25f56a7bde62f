"""Model variants as config (``FaceConfig``'s block, mlp, mlp_activation, dense_ffn_size, seq_moe, rotary_fraction,
bias, special_token_ids): the engine equals the reference loops token for token on every variant, a Phi network
from transformers gives the same logits through fastface, parameter counts are exact, every new field is validated,
and configs written before the fields existed load as the model they described."""

import dataclasses
import json
import math

import pytest
import torch

from fastface.checkpoint import CheckpointError, load_checkpoint
from fastface.config import GROUP_GENERATION, PRESETS, SEQ_EXPERTS, SPECIAL_TOKENS, FaceConfig
from fastface.convert import PHI_VARIANT, phi_state_dict_to_fastface
from fastface.engine import Engine
from fastface.model import BlockContext, FaceTransformer, rotary_tables
from fastface.prompts import mmu_prompt_ids, t2i_prompt_ids, t2i_sequence
from fastface.sampling import generate_answer_ids, generate_image_tokens
from fastface.testing import assert_close

NEW_FIELDS = ("block", "mlp", "mlp_activation", "dense_ffn_size", "seq_moe", "rotary_fraction", "bias",
              "special_token_ids")

# small shapes (the tiny preset: hidden 32, 4 heads of 8 dims), odd MLP widths
VARIANTS = {
    "phi": dict(PHI_VARIANT, rotary_fraction=0.5, dense_ffn_size=37),
    "phi-full-rotary": dict(PHI_VARIANT, dense_ffn_size=37),
    "dense-swiglu": dict(mlp="dense", mlp_activation="swiglu", seq_moe=False, dense_ffn_size=45),
    "dense-swiglu-seq-moe-bias": dict(mlp="dense", mlp_activation="swiglu", bias=True, dense_ffn_size=29),
    "dense-gelu-parallel-seq-moe": dict(mlp="dense", mlp_activation="gelu_tanh", block="parallel", dense_ffn_size=53),
    "moe-parallel": dict(block="parallel"),
    "moe-parallel-bias-no-seq-moe": dict(block="parallel", bias=True, seq_moe=False),
    "moe-quarter-rotary": dict(rotary_fraction=0.25),
}


PARTIAL = {name for name, v in VARIANTS.items() if v.get("rotary_fraction", 1.0) < 1}


def variant_config(name: str) -> FaceConfig:
    return FaceConfig.from_name("tiny", **VARIANTS[name])


def engine_variants():
    return list(VARIANTS)


def sharp_model(cfg: FaceConfig, seed: int = 11) -> FaceTransformer:
    """Random weights with non-zero biases and LayerNorm affines (the init leaves them 0 and 1, which would hide a
    misplaced bias), sharp logits so tokens are not uniform noise, reference MoE kernels."""
    model = FaceTransformer(cfg).eval()
    model.reset_parameters(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        model.lm_head.weight.mul_(40)
    model.set_backend("reference")
    return model


_MODELS: dict[str, FaceTransformer] = {}


def model_of(name: str) -> FaceTransformer:
    if name not in _MODELS:
        _MODELS[name] = sharp_model(variant_config(name))
    return _MODELS[name]


# ------------------------------------------------------------------------------ engine == reference loops


@pytest.mark.parametrize("variant", ["phi", "dense-swiglu", "moe-parallel-bias-no-seq-moe"])
def test_profiling_times_every_variant(variant):
    """Timers hook each block's sublayers: a dense MLP counts as "moe", a missing sequence MoE is skipped."""
    from fastface.profiling import Timers

    model = model_of(variant)
    timers = Timers()
    ids = t2i_prompt_ids(PROMPTS[:1], model.config)
    plain = Engine(model).generate_image_tokens(ids, steps=2, guidance=2.0, seeds=[0])
    timed = Engine(model).generate_image_tokens(ids, steps=2, guidance=2.0, seeds=[0], timers=timers)
    assert torch.equal(plain, timed)
    assert timers.seconds.get("attention", 0) > 0 and timers.seconds.get("moe", 0) > 0
    assert ("seq_moe" in timers.seconds) == model.config.seq_moe

PROMPTS = [[9, 10, 11], [], [12, 13, 14, 15, 16, 17, 18], [20, 21]]


@pytest.mark.parametrize("variant", engine_variants())
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_variant_image_tokens_engine_equals_reference(variant, backend, guidance):
    model = model_of(variant)
    ids = t2i_prompt_ids(PROMPTS, model.config)
    kw = dict(steps=5, guidance=guidance, seeds=[3, 1, 4, 1])
    want = generate_image_tokens(model, ids, backend="reference", **kw)
    got = Engine(model, backend=backend).generate_image_tokens(ids, **kw)
    diff = int((got != want).sum())
    assert diff == 0, f"{variant}: {diff} / {want.numel()} tokens differ from the reference"
    assert len(set(want.flatten().tolist())) > 1, "a degenerate model: every token the same"


@pytest.mark.parametrize("variant", engine_variants())
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("top_p", [None, 0.8])
def test_variant_answers_engine_equal_reference(variant, backend, top_p):
    model = model_of(variant)
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    img = torch.randint(0, cfg.codebook_size, (3, cfg.image_tokens), generator=gen)
    ids = mmu_prompt_ids(img, [[20, 21, 22], [23], [24, 25, 26, 27, 28]], cfg)  # left padding
    e_sem, e_id = torch.randn(3, cfg.sem_dim, generator=gen), torch.randn(3, cfg.id_dim, generator=gen)
    kw = dict(max_new_tokens=6, top_p=top_p, seeds=[3, 4, 5], allowed_vocab=cfg.text_vocab_size, e_sem=e_sem,
              e_id=e_id)
    want = generate_answer_ids(model, ids, **kw)
    assert Engine(model, backend=backend).generate_answer_ids(ids, **kw) == want
    assert any(len(a) for a in want)


@pytest.mark.parametrize("variant", sorted(PARTIAL))
def test_partial_rotary_refuses_head_wide_tables(variant):
    """A model that rotates rd < hd dims never applies a table of another width: it raises, naming the widths."""
    model = model_of(variant)
    cfg = model.config
    ids = torch.tensor([[9, 10, 11]])
    positions = torch.arange(3)[None]
    task = torch.tensor([0])
    for dim, ok in ((cfg.rotary_dim, True), (cfg.head_dim, False)):
        cos, sin = rotary_tables(positions, dim, cfg.rope_theta)
        ctx = BlockContext(mask=torch.ones(1, 1, 3, 3, dtype=torch.bool).tril(), cos=cos, sin=sin,
                           groups=task.repeat(3), task=task, cond_mask=torch.ones(1, 3, dtype=torch.bool))
        if ok:
            model.blocks(ids, ctx)
        else:
            with pytest.raises(ValueError, match=f"rotary tables are {cfg.head_dim} wide.*rotates {cfg.rotary_dim}"):
                model.blocks(ids, ctx)


def t2i_example(cfg: FaceConfig) -> torch.Tensor:
    return t2i_sequence(t2i_prompt_ids([[9, 10], [11]], cfg), torch.full((2, cfg.image_tokens), cfg.mask_token_id), cfg)


def test_each_field_changes_the_network():
    """A field the model ignored would leave the logits alone."""
    base = variant_config("phi")
    ids, task = t2i_example(base), torch.tensor([1, 1])
    seen = []
    for change in ({}, dict(rotary_fraction=1.0), dict(block="sequential"), dict(mlp_activation="swiglu"),
                   dict(seq_moe=True), dict(mlp="moe", mlp_activation="swiglu")):
        with torch.no_grad():
            logits = sharp_model(dataclasses.replace(base, **change), seed=2)(ids, task).logits
        for other in seen:
            assert not torch.allclose(logits, other), change
        seen.append(logits)


@pytest.mark.parametrize("variant", [n for n, v in VARIANTS.items() if v.get("bias")])
def test_bias_false_is_the_network_with_zero_biases(variant):
    cfg = variant_config(variant)
    ids, task = t2i_example(cfg), torch.tensor([1, 1])
    with_bias = sharp_model(cfg)
    no_bias = FaceTransformer(dataclasses.replace(cfg, bias=False)).eval()
    no_bias.set_backend("reference")
    linear_biases = {name + ".bias" for name, m in with_bias.named_modules()
                     if isinstance(m, torch.nn.Linear) and m.bias is not None}
    mlp_biases = 0 if cfg.mlp == "moe" else 3 if cfg.mlp_activation == "swiglu" else 2  # no bias in the MoE op
    assert len(linear_biases) == 1 + cfg.num_layers * (2 + mlp_biases)  # LM head; qkv, out; the dense MLP
    state = with_bias.state_dict()
    assert {k for k in state if k not in no_bias.state_dict()} == linear_biases
    no_bias.load_state_dict({k: v for k, v in state.items() if k not in linear_biases})
    with torch.no_grad():
        assert not torch.allclose(with_bias(ids, task).logits, no_bias(ids, task).logits)
        for name in linear_biases:
            with_bias.get_parameter(name).zero_()
        assert_close(with_bias(ids, task).logits, no_bias(ids, task).logits, atol=1e-6, rtol=1e-6, name="logits")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains(variant):
    """A training forward: the load-balancing loss only where there is a token router, a gradient for every weight
    (but the embeddings' projections, given no embeddings, and a sequence router whose every row chose two Copy
    experts: its weights then mix two equal outputs, a zero gradient by construction)."""
    cfg = variant_config(variant)
    model = sharp_model(cfg).train()
    out = model(t2i_example(cfg), torch.tensor([1, 1]))
    assert (float(out.aux_loss.detach()) > 0) == (cfg.mlp == "moe")
    (out.logits.float().square().mean() + out.aux_loss).backward()
    copies = {f"layers.{i}.seq_moe.router" for i, (_, experts) in enumerate(out.routes)
              if experts.numel() and all({SEQ_EXPERTS[GROUP_GENERATION][e] for e in row} == {"copy"}
                                         for row in experts.tolist())}
    for name, p in model.named_parameters():
        if "sem_proj" not in name and "id_proj" not in name and name not in copies:
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), f"no gradient for {name}"


# ----------------------------------------------------------------------------------------- the Phi oracle

@pytest.mark.parametrize("hidden,heads,fraction,ffn", [(64, 4, 0.5, 128), (80, 4, 0.4, 96), (48, 3, 1.0, 72)])
def test_phi_logits_equal_transformers(hidden, heads, fraction, ffn):
    """transformers' PhiForCausalLM with random weights, its state dict mapped into a FaceTransformer of the Phi
    variant: the same causal logits on text (fp32, relative error < 1e-5). 80/4/0.4 is Phi-2's partial rotary (20-dim
    heads, 8 rotated), whose frequencies are not a subset of the full head's."""
    transformers = pytest.importorskip("transformers")
    vocab = 300
    pcfg = transformers.PhiConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2,
                                  num_attention_heads=heads, partial_rotary_factor=fraction, hidden_act="gelu_new",
                                  layer_norm_eps=1e-5, attn_implementation="eager")
    torch.manual_seed(0)
    phi = transformers.PhiForCausalLM(pcfg).eval()
    with torch.no_grad():
        for name, p in phi.named_parameters():  # every weight random, biases and LayerNorm affines included
            p.copy_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.08) + (1.0 if "layernorm.weight" in name else 0))
        phi.lm_head.weight.mul_(4)
    cfg = FaceConfig(text_vocab_size=200, codebook_size=vocab - 201, hidden_size=hidden, num_layers=2, num_heads=heads,
                     dense_ffn_size=ffn, rotary_fraction=fraction, rope_theta=pcfg.rope_parameters["rope_theta"],
                     layer_norm_eps=pcfg.layer_norm_eps, **PHI_VARIANT)
    assert cfg.vocab_size == vocab
    model = FaceTransformer(cfg).eval()
    model.load_state_dict(phi_state_dict_to_fastface(phi.state_dict(), cfg))
    ids = torch.randint(0, vocab, (3, 23), generator=torch.Generator().manual_seed(5))  # specials and codes too
    with torch.no_grad():
        want = phi(ids).logits
        got = model.causal_logits(ids)
    assert got.shape == want.shape == (3, 23, vocab)
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel < 1e-5, f"relative error {rel:.2e}"
    assert float(want.std()) > 1.0, "logits large enough to show a wrong layout"


def test_phi_mapping_refuses_what_it_cannot_place():
    transformers = pytest.importorskip("transformers")
    pcfg = transformers.PhiConfig(vocab_size=100, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                                  num_attention_heads=4, partial_rotary_factor=0.5)
    state = transformers.PhiForCausalLM(pcfg).state_dict()
    cfg = FaceConfig(text_vocab_size=50, codebook_size=49, hidden_size=32, num_layers=1, num_heads=4,
                     dense_ffn_size=40, rotary_fraction=0.5, **PHI_VARIANT)
    assert set(phi_state_dict_to_fastface(state, cfg)) == set(FaceTransformer(cfg).state_dict())
    with pytest.raises(ValueError, match="block"):
        phi_state_dict_to_fastface(state, dataclasses.replace(cfg, block="sequential"))
    with pytest.raises(ValueError, match="missing 'lm_head.bias'"):
        phi_state_dict_to_fastface({k: v for k, v in state.items() if k != "lm_head.bias"}, cfg)
    with pytest.raises(ValueError, match="no place in the model.*q_layernorm"):
        phi_state_dict_to_fastface({**state, "model.layers.0.self_attn.q_layernorm.weight": torch.ones(8)}, cfg)
    with pytest.raises(ValueError, match=r"fc1.weight' has shape \(40, 32\), the config needs \(48, 32\)"):
        phi_state_dict_to_fastface(state, dataclasses.replace(cfg, dense_ffn_size=48))


def test_causal_logits_is_causal():
    """A later token never changes an earlier row's logits (no sequence-level MoE in the Phi variant)."""
    model = model_of("phi")
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model.causal_logits(ids), model.causal_logits(changed)
    assert_close(b[:, :8], a[:, :8], atol=1e-5, rtol=1e-5, name="rows before the change")
    assert not torch.allclose(a[:, 8:], b[:, 8:])


# ------------------------------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_num_parameters_of_every_variant(variant):
    cfg = variant_config(variant)
    model = FaceTransformer(cfg)
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_num_parameters_of_every_preset(name):
    cfg = FaceConfig.from_name(name)
    with torch.device("meta"):  # no memory: Show-o scale presets are 1-6 billion parameters
        model = FaceTransformer(cfg)
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())


def test_showo_preset_is_showo():
    """Show-o 256: Phi-1.5 over 50295 text ids + 10 added tokens + 8192 codes + <mask> = 58498 ids."""
    cfg = FaceConfig.from_name("showo-256")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.dense_ffn_size, cfg.rotary_dim) == \
        (2048, 24, 32, 8192, 32)
    assert (cfg.block, cfg.mlp, cfg.mlp_activation, cfg.seq_moe, cfg.bias) == \
        ("parallel", "dense", "gelu_tanh", False, True)
    assert (cfg.image_token_offset, cfg.mask_token_id, cfg.vocab_size) == (50305, 58497, 58498)
    assert (cfg.pad_id, cfg.soi_id, cfg.eoi_id, cfg.t2i_id, cfg.mmu_id) == (50295, 50296, 50297, 50300, 50301)
    assert cfg.bos_id == cfg.eos_id == cfg.unk_id == 50256
    assert 1.4e9 < cfg.num_parameters() < 1.5e9


# --------------------------------------------------------------------------------- the special ids

def test_forward_reads_the_special_ids_from_the_config():
    """The same network under a vocabulary whose specials sit elsewhere (ids 0..7 swapped with 56..63, rows of the
    embedding and the LM head permuted alike) computes the same logits on the same sequence spelled in its ids:
    masks, positions and the sequence-MoE condition follow ``special_token_ids``."""
    a_cfg = FaceConfig.from_name("tiny")
    b_cfg = dataclasses.replace(a_cfg, special_token_ids=tuple(range(56, 64)))
    perm = torch.arange(a_cfg.vocab_size)
    perm[:8], perm[56:64] = torch.arange(56, 64), torch.arange(8)  # an id of a -> the same token's id in b
    a = sharp_model(a_cfg)
    b = FaceTransformer(b_cfg).eval()
    state = a.state_dict()
    inverse = torch.argsort(perm)
    b.load_state_dict({**state, "embed.weight": state["embed.weight"][inverse],
                       "lm_head.weight": state["lm_head.weight"][inverse]})
    b.set_backend("reference")
    img = torch.randint(0, a_cfg.codebook_size, (2, a_cfg.image_tokens), generator=torch.Generator().manual_seed(0))
    t2i = t2i_sequence(t2i_prompt_ids([[9, 57], [60]], a_cfg), img + a_cfg.image_token_offset, a_cfg)
    mmu = mmu_prompt_ids(img, [[20, 58, 21], [59]], a_cfg)
    for ids, task in ((t2i, torch.tensor([1, 1])), (mmu, torch.tensor([0, 0]))):
        with torch.no_grad():
            want = a(ids, task).logits
            got = b(perm[ids], task).logits[..., perm]
        assert_close(got, want, atol=1e-6, rtol=1e-6, name="logits under the permuted vocabulary")


# ------------------------------------------------------------------------------------------- validation

BAD = [
    ("block", "serial"), ("block", 3), ("block", None),
    ("mlp", "sparse"), ("mlp", ["moe"]),
    ("mlp_activation", "relu"), ("mlp_activation", 1),
    ("dense_ffn_size", 0), ("dense_ffn_size", 2**30), ("dense_ffn_size", 3.0), ("dense_ffn_size", True),
    ("seq_moe", 1), ("seq_moe", "yes"), ("bias", 0), ("bias", None),
    ("rotary_fraction", 0), ("rotary_fraction", -0.5), ("rotary_fraction", 1.5), ("rotary_fraction", math.nan),
    ("rotary_fraction", math.inf), ("rotary_fraction", "half"), ("rotary_fraction", True),
    ("rotary_fraction", 0.1),  # int(8 * 0.1) = 0 dims
    ("rotary_fraction", 0.375),  # 3 dims: odd
    ("special_token_ids", [0, 1, 2]), ("special_token_ids", "01234567"), ("special_token_ids", 0),
    ("special_token_ids", [0, 1, 2, 3, 4, 5, 6, 64]),  # not a text id (text_vocab_size 64)
    ("special_token_ids", [0, 1, 2, 3, 4, 5, 6, -1]), ("special_token_ids", [0, 1, 2, 3, 4, 5, 6, 7.0]),
    ("special_token_ids", [0, 1, 2, 3, 4, 5, 5, 7]),  # <soi> and <eoi> share an id
    ("special_token_ids", [0, 0, 2, 3, 4, 5, 6, 7]),  # <pad> and <bos>
]


@pytest.mark.parametrize("field,value", BAD)
def test_each_new_field_is_validated(field, value):
    with pytest.raises(ValueError, match=rf"'{field}(\[\d+\])?'"):
        FaceConfig.from_name("tiny", **{field: value})


def test_cross_field_rules():
    with pytest.raises(ValueError, match="'mlp_activation'='gelu_tanh' needs mlp='dense'"):
        FaceConfig(mlp_activation="gelu_tanh")
    with pytest.raises(ValueError, match="head_dim must be even"):
        FaceConfig(hidden_size=36, num_heads=4)
    assert FaceConfig(hidden_size=36, num_heads=4, rotary_fraction=0.25).rotary_dim == 2  # 9-dim heads, 2 rotated
    FaceConfig(special_token_ids=(9, 8, 8, 3, 4, 5, 6, 8))  # <bos>, <eos> and <unk> may share one id


@pytest.mark.parametrize("field,value", [("block", "serial"), ("rotary_fraction", 2.0), ("seq_moe", "no"),
                                         ("special_token_ids", [0, 1, 2])])
def test_a_checkpoint_with_a_bad_new_field_fails_fast(tiny_checkpoint, field, value):
    path = tiny_checkpoint / "config.json"
    cfg = json.loads(path.read_text())
    cfg["model"][field] = value
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"'{field}'"):
        load_checkpoint(tiny_checkpoint)


def test_a_config_written_before_the_variant_fields_loads_as_before(tiny_checkpoint):
    """config.json files without the new fields describe today's model: MoE, sequential, full rotary, no bias,
    specials at 0..7."""
    path = tiny_checkpoint / "config.json"
    cfg = json.loads(path.read_text())
    assert set(NEW_FIELDS) <= set(cfg["model"])
    new_model, *_ = load_checkpoint(tiny_checkpoint)
    for name in NEW_FIELDS:
        del cfg["model"][name]
    path.write_text(json.dumps(cfg))
    old_model, *_ = load_checkpoint(tiny_checkpoint)
    assert old_model.config == FaceConfig.from_name("tiny") == new_model.config
    assert old_model.config.special_token_ids == tuple(range(len(SPECIAL_TOKENS)))
    ids, task = t2i_example(old_model.config), torch.tensor([1, 1])
    with torch.no_grad():
        assert torch.equal(old_model(ids, task).logits, new_model(ids, task).logits)


def test_config_round_trips_through_json():
    for name in VARIANTS:
        cfg = variant_config(name)
        assert FaceConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    showo = FaceConfig.from_name("showo-256")
    assert FaceConfig.from_dict(json.loads(json.dumps(showo.to_dict()))) == showo
