"""MAGVIT-v2 (Show-o's image tokenizer): LFQ against vector-quantize-pytorch and the written-out formulas, shapes of the
256/512 configs, Show-o's state-dict keys, encode/decode on random weights, save/load, refusals, config checks."""

import importlib.util
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastface.testing import assert_close
from fastface.vq.magvit import LFQ, PRESETS, MagvitConfig, MagvitTokenizer
from fastface.weights import CheckpointError


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return MagvitTokenizer.from_name("tiny", **overrides).eval()


def images(n=2, side=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)


def random_z(shape, scale=1.0, seed=0, uniform=False):
    g = torch.Generator().manual_seed(seed)
    z = (torch.rand(shape, generator=g) * 2 - 1 if uniform else torch.randn(shape, generator=g)) * scale
    z.view(-1)[:: 7] = 0.0  # exact zeros quantise to -1 (bit 0) in both conventions
    return z


# --------------------------------------------------------------------------------------------- LFQ parity
# vector-quantize-pytorch's LFQ (lucidrains, the reference implementation of the paper's quantiser) uses the same
# conventions as Show-o's LFQuantizer: q = +1 where z > 0 else -1; id = sum_d (q_d > 0) * 2**(D-1-d) (its ``mask`` is
# 2 ** arange(D-1, -1, -1), Show-o's ``power_vals``), so channel 0 is the most significant bit in both. Its entropy
# loss is the paper's code-level one (softmax over the K codes of 2 * inv_temperature * z.c, i.e. -||z - c||^2 at
# inv_temperature 1): our entropy="codes". Show-o's own (entropy="bits") is the per-bit factorisation, checked below
# against Show-o's formulas written out here.


@pytest.mark.parametrize("bits, shape", [(13, (3, 13, 5, 7)), (6, (2, 6, 1, 9)), (1, (4, 1, 3, 3))])
def test_lfq_ids_and_codes_match_vector_quantize_pytorch(bits, shape):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    ref = vqp.LFQ(codebook_size=2**bits, dim=bits, entropy_loss_weight=0.0).eval()
    ours = LFQ(bits)
    z = random_z(shape)
    with torch.no_grad():
        want_q, want_ids, _ = ref(z)
    z_q, ids = ours.quantize(z)
    assert ids.dtype == torch.int64 and ids.shape == (shape[0], *shape[2:])
    assert torch.equal(ids, want_ids.long()), f"{int((ids != want_ids).sum())} ids differ"
    assert torch.equal(z_q, want_q.float())
    assert torch.equal(ours.codes_to_vectors(ids).permute(0, 3, 1, 2), ref.indices_to_codes(want_ids).float())
    # every id <-> its code, both ways
    all_ids = torch.arange(2**bits).view(1, -1, 1)
    assert torch.equal(ours.embedding, ref.indices_to_codes(all_ids)[0, :, :, 0].t().float())
    assert torch.equal(ours.ids_of(ours.embedding.t()[None, :, :, None])[0, :, 0], torch.arange(2**bits))


@pytest.mark.parametrize("bits, scale, shape", [(6, 0.25, (3, 6, 5, 7)), (13, 0.04, (2, 13, 4, 5)),
                                                (4, 0.5, (1, 4, 1, 1))])
def test_lfq_code_entropy_matches_vector_quantize_pytorch(bits, scale, shape):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    ref = vqp.LFQ(codebook_size=2**bits, dim=bits, entropy_loss_weight=1.0, commitment_loss_weight=1.0,
                  diversity_gamma=1.0).train()
    ours = LFQ(bits, beta=0.0, entropy_multiplier=1.0, commit_loss_multiplier=1.0)
    # vector-quantize-pytorch clamps probabilities at 1e-5 inside its log: |z| <= scale keeps every code's probability
    # above it (>= exp(-4 D scale) / K), so the comparison checks the formula, not the clamp
    z = random_z(shape, scale, seed=bits, uniform=True)
    flat = z.movedim(1, -1).reshape(-1, bits)
    probs = (2 * flat @ ours.embedding.t()).softmax(-1)
    assert float(probs.min()) > 1e-5
    (_, _, aux), parts = ref(z, inv_temperature=1.0, return_loss_breakdown=True)
    got = ours.losses(z, entropy="codes")
    assert_close(got.per_sample_entropy, parts.per_sample_entropy, atol=1e-5, rtol=1e-5)
    assert_close(got.codebook_entropy, parts.batch_entropy, atol=1e-5, rtol=1e-5)
    assert_close(got.entropy_loss, parts.per_sample_entropy - parts.batch_entropy, atol=1e-5, rtol=1e-5)
    assert_close(got.commitment_loss, parts.commitment, atol=1e-6, rtol=1e-6)
    assert_close(got.entropy_loss + got.commitment_loss, aux, atol=1e-5, rtol=1e-5)


def showo_lfq_losses(z, beta, entropy_multiplier, commit_loss_multiplier):
    """Show-o's LFQuantizer training terms, written out from their formulas (not from fastface's code)."""
    D = z.shape[1]
    flat = z.permute(0, 2, 3, 1).reshape(-1, D)
    q = torch.where(flat > 0, torch.ones_like(flat), -torch.ones_like(flat))
    st = flat + (q - flat).detach()
    logits = torch.stack([-(flat - 1) ** 2, -(flat + 1) ** 2], dim=-1)  # categories (+1, -1) per bit
    dist = torch.distributions.Categorical(logits=logits)
    per_sample = dist.entropy().mean()
    codebook = torch.distributions.Categorical(probs=dist.probs.mean(0)).entropy().mean()
    commit = torch.mean((st.detach() - flat) ** 2) + beta * torch.mean((st - flat.detach()) ** 2)
    return (per_sample - codebook) * entropy_multiplier, commit * commit_loss_multiplier, per_sample, codebook


@pytest.mark.parametrize("bits, shape", [(13, (2, 13, 4, 3)), (5, (3, 5, 7, 1))])
def test_lfq_bit_entropy_and_commitment_match_showo_formulas(bits, shape):
    lfq = LFQ(bits, beta=0.25, entropy_multiplier=0.1, commit_loss_multiplier=0.1)
    z1 = random_z(shape, seed=3).requires_grad_(True)
    z2 = z1.detach().clone().requires_grad_(True)
    got = lfq.losses(z1)  # entropy="bits" is the default: Show-o's
    want = showo_lfq_losses(z2, 0.25, 0.1, 0.1)
    for name, g, w in zip(("entropy_loss", "commitment_loss", "per_sample_entropy", "codebook_entropy"), got, want):
        assert_close(g, w, atol=1e-6, rtol=1e-5, name=name)
    (got.entropy_loss + got.commitment_loss).backward()
    (want[0] + want[1]).backward()
    assert_close(z1.grad, z2.grad, atol=1e-7, rtol=1e-5)
    # the factorisation: code-level per-sample entropy is D times the per-bit mean; for one token the batch
    # average is that token's (independent-bit) distribution, so the codebook entropies relate the same way
    codes = lfq.losses(z1.detach(), entropy="codes")
    assert_close(codes.per_sample_entropy, bits * got.per_sample_entropy, atol=1e-5, rtol=1e-5)
    one = z1.detach()[:1, :, :1, :1]
    assert_close(lfq.losses(one, entropy="codes").codebook_entropy, bits * lfq.losses(one).codebook_entropy,
                 atol=1e-5, rtol=1e-5)
    # and the marginals bound the joint: H(mean q) <= sum of the bits' entropies
    assert float(codes.codebook_entropy) <= bits * float(got.codebook_entropy.detach()) + 1e-5
    with pytest.raises(ValueError, match="entropy"):
        lfq.losses(z1, entropy="joint")


def test_lfq_inference_is_exact_and_needs_no_losses():
    lfq = LFQ(13)
    z = random_z((2, 13, 3, 4))
    z_q, ids = lfq(z)  # no losses unless asked
    assert z_q.dtype == torch.float32 and set(z_q.unique().tolist()) == {-1.0, 1.0}
    assert int(ids.min()) >= 0 and int(ids.max()) < 8192
    assert torch.equal(lfq.codes_to_vectors(ids).permute(0, 3, 1, 2), z_q)
    assert torch.equal(z_q, torch.where(z > 0, 1.0, -1.0))
    # training: straight-through, gradient 1 to z
    zg = z.clone().requires_grad_(True)
    z_q, ids2, losses = lfq(zg, losses=True)
    assert torch.equal(ids2, ids) and torch.equal(z_q.detach(), torch.where(z > 0, 1.0, -1.0))
    z_q.sum().backward()
    assert torch.equal(zg.grad, torch.ones_like(z))
    assert all(t.dim() == 0 and torch.isfinite(t) for t in losses)
    # id formula: bit d of the id is (z_d > 0), channel 0 most significant
    bits = (z > 0).long()
    want = sum(bits[:, d] << (12 - d) for d in range(13))
    assert torch.equal(ids, want)
    with pytest.raises(ValueError, match=r"\[B, 13"):
        lfq.quantize(torch.zeros(2, 12, 3, 3))


# ---------------------------------------------------------------------------------------- config, shapes
def conv_params(c_in, c_out, k):
    return c_in * c_out * k * k + c_out


def showo_param_count(ch=128, enc=((1, 2, 2, 4, 4), (4, 3, 4, 3, 4)), dec=((1, 1, 2, 2, 4), (4, 4, 3, 4, 3)), D=13):
    """Parameters of Show-o's MAGVITv2 (no attention levels), counted from their layer shapes."""
    norm = lambda c: 2 * c
    res = lambda a, b: norm(a) + conv_params(a, b, 3) + norm(b) + conv_params(b, b, 3) + (conv_params(a, b, 1) if a != b
                                                                                          else 0)
    attn = lambda c: norm(c) + 4 * conv_params(c, c, 1)
    mid = lambda c: 2 * res(c, c) + attn(c)
    n = conv_params(3, ch, 3)
    mult, blocks = enc
    c = ch
    for i, (m, nb) in enumerate(zip(mult, blocks)):
        for _ in range(nb):
            n, c = n + res(c, ch * m), ch * m
        if i < len(mult) - 1:
            n += conv_params(c, c, 3)
    n += mid(c) + norm(c) + conv_params(c, D, 3) + conv_params(D, D, 1)
    mult, blocks = dec
    c = ch * mult[-1]
    n += conv_params(D, c, 3) + mid(c)
    for i in reversed(range(len(mult))):
        for _ in range(blocks[i]):
            n, c = n + res(c, ch * mult[i]), ch * mult[i]
        if i > 0:
            n += conv_params(c, c, 3)
    return n + norm(c) + conv_params(c, 3, 3) + conv_params(D, D, 1)


@pytest.mark.parametrize("preset, side, tokens", [("showo-256", 256, 256), ("showo-512", 512, 1024)])
def test_showo_configs_on_meta(preset, side, tokens):
    cfg = MagvitConfig(**PRESETS[preset])
    assert (cfg.resolution, cfg.grid, cfg.num_tokens, cfg.codebook_size, cfg.token_size) == (side, side // 16,
                                                                                          tokens, 8192, 13)
    with torch.device("meta"):
        model = MagvitTokenizer(cfg)
        z = model.encoder(torch.empty(2, 3, side, side))
        x = model.decoder(torch.empty(2, 13, side // 16, side // 16))
    assert tuple(z.shape) == (2, 13, side // 16, side // 16) and tuple(x.shape) == (2, 3, side, side)
    n = sum(p.numel() for p in model.parameters())
    assert n == showo_param_count() == 95_387_004  # ~95.4 M: 55.4 M encoder, 39.9 M decoder (~382 MB in fp32)
    assert not any(len(level.attn) for level in [*model.encoder.down, *model.decoder.up])  # [5] is never reached
    assert tuple(model.quantize.embedding.shape) == (8192, 13) and model.quantize.power_vals.dtype == torch.int64


@pytest.mark.parametrize("field, value", [
    ("ch", 0), ("ch", 48), ("ch", True), ("encoder_ch_mult", []), ("encoder_ch_mult", [1, 2.0]),
    ("encoder_ch_mult", [1] * 9), ("encoder_num_res_blocks", [4, 3]), ("encoder_num_res_blocks", [0, 3, 4, 3, 4]),
    ("decoder_ch_mult", [1, 2]), ("decoder_num_res_blocks", [1, 1, 1, 1, 99]), ("attn_resolutions", [0]),
    ("dropout", 1.0), ("dropout", float("nan")), ("in_ch", 4), ("out_ch", 1), ("resolution", 250),
    ("resolution", 10**9), ("z_channels", 12), ("double_z", True), ("codebook_size", 4096), ("token_size", 0),
    ("token_size", 40), ("beta", -1.0), ("entropy_multiplier", float("inf")), ("commit_loss_multiplier", "0.1"),
])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MagvitConfig(**{field: value})


def test_config_dict_round_trip_and_showo_metadata():
    cfg = MagvitConfig()
    assert MagvitConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # Show-o's config.json: MAGVITv2.__init__ takes no argument, so it holds only metadata -> the defaults
    assert MagvitConfig.from_dict({"_class_name": "MAGVITv2", "_version": "0.0.1"}) == cfg
    with pytest.raises(ValueError, match="unknown"):
        MagvitConfig.from_dict({"colours": 3})
    with pytest.raises(ValueError, match="VQModel"):
        MagvitConfig.from_dict({"_class_name": "VQModel"})


# ------------------------------------------------------------------------------------- Show-o key layout
# Keys of Show-o's MAGVITv2 for the "tiny" config (ch 32, multipliers (1, 2) with one block each, attention at side
# 16, 6 bits), read off their modeling_magvitv2.py / common_modules.py: VQGANEncoder (conv_in, down[i].block[j],
# down[i].attn[j], down[i].downsample.conv, mid.block_1/attn_1/block_2, norm_out, conv_out, quant_conv), ResnetBlock
# (norm1, conv1, norm2, conv2, nin_shortcut when the width changes; no temb_proj: temb_ch is 0), AttnBlock (norm, q,
# k, v, proj_out), VQGANDecoder (conv_in, mid, up[i] stored finest first, up[i].upsample.conv for i > 0, norm_out,
# conv_out, post_quant_conv), LFQuantizer buffers (embedding, power_vals). One or more per module kind, with shapes.
SHOWO_TINY_KEYS = {
    "encoder.conv_in.weight": (32, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (32,),
    "encoder.down.0.block.0.conv1.weight": (32, 32, 3, 3),
    "encoder.down.0.block.0.norm2.bias": (32,),
    "encoder.down.0.block.0.conv2.bias": (32,),
    "encoder.down.0.downsample.conv.weight": (32, 32, 3, 3),
    "encoder.down.1.block.0.conv1.weight": (64, 32, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (64, 32, 1, 1),
    "encoder.down.1.attn.0.norm.weight": (64,),
    "encoder.down.1.attn.0.q.weight": (64, 64, 1, 1),
    "encoder.down.1.attn.0.k.bias": (64,),
    "encoder.down.1.attn.0.v.weight": (64, 64, 1, 1),
    "encoder.down.1.attn.0.proj_out.weight": (64, 64, 1, 1),
    "encoder.mid.block_1.conv1.weight": (64, 64, 3, 3),
    "encoder.mid.attn_1.q.weight": (64, 64, 1, 1),
    "encoder.mid.block_2.norm2.weight": (64,),
    "encoder.norm_out.weight": (64,),
    "encoder.conv_out.weight": (6, 64, 3, 3),
    "encoder.quant_conv.weight": (6, 6, 1, 1),
    "decoder.post_quant_conv.weight": (6, 6, 1, 1),
    "decoder.conv_in.weight": (64, 6, 3, 3),
    "decoder.mid.block_1.norm1.weight": (64,),
    "decoder.mid.attn_1.proj_out.bias": (64,),
    "decoder.mid.block_2.conv2.weight": (64, 64, 3, 3),
    "decoder.up.1.block.0.conv1.weight": (64, 64, 3, 3),
    "decoder.up.1.attn.0.q.weight": (64, 64, 1, 1),
    "decoder.up.1.upsample.conv.weight": (64, 64, 3, 3),
    "decoder.up.0.block.0.conv1.weight": (32, 64, 3, 3),
    "decoder.up.0.block.0.nin_shortcut.weight": (32, 64, 1, 1),
    "decoder.norm_out.weight": (32,),
    "decoder.conv_out.weight": (3, 32, 3, 3),
    "quantize.embedding": (64, 6),
    "quantize.power_vals": (6,),
}
SHOWO_TINY_ABSENT = ["encoder.down.1.downsample.conv.weight", "decoder.up.0.upsample.conv.weight",
                     "encoder.down.0.attn.0.q.weight", "decoder.up.0.attn.0.q.weight",
                     "encoder.down.0.block.0.nin_shortcut.weight", "encoder.down.0.block.0.temb_proj.weight"]


def test_state_dict_keys_are_showo_magvitv2s():
    with torch.device("meta"):
        sd = MagvitTokenizer.from_name("tiny").state_dict()
    for key, shape in SHOWO_TINY_KEYS.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert not set(SHOWO_TINY_ABSENT) & set(sd)
    # 8 tensors per ResnetBlock (+2 with a shortcut), 10 per AttnBlock, 2 per conv / norm
    per_side = 2 + (8 + 2) + (8 + 2 + 10) + (8 + 10 + 8) + 2 + 2 + 2
    assert len(sd) == 2 * per_side + 2
    keys = list(sd)
    assert keys[0] == "encoder.conv_in.weight" and keys[-2:] == ["quantize.embedding", "quantize.power_vals"]
    assert keys.index("decoder.conv_in.weight") > keys.index("encoder.quant_conv.bias")  # encoder, decoder, quantize
    assert keys.index("decoder.up.0.block.0.conv1.weight") < keys.index("decoder.up.1.block.0.conv1.weight")
    assert sd["quantize.power_vals"].dtype == torch.int64 and sd["quantize.embedding"].dtype == torch.float32
    # the defaults: 5 levels, Show-o's block counts
    with torch.device("meta"):
        full = MagvitTokenizer().state_dict()
    assert "encoder.down.0.block.3.conv2.weight" in full and "encoder.down.1.block.3.conv2.weight" not in full
    assert "encoder.down.3.downsample.conv.weight" in full and "encoder.down.4.downsample.conv.weight" not in full
    assert "decoder.up.1.block.3.conv1.weight" in full and "decoder.up.2.block.3.conv1.weight" not in full
    assert tuple(full["decoder.up.4.block.0.conv1.weight"].shape) == (512, 512, 3, 3)
    assert tuple(full["decoder.up.1.block.0.nin_shortcut.weight"].shape) == (128, 256, 1, 1)
    assert tuple(full["decoder.up.3.block.0.nin_shortcut.weight"].shape) == (256, 512, 1, 1)
    assert not {"decoder.up.0.block.0.nin_shortcut.weight", "decoder.up.2.block.0.nin_shortcut.weight"} & set(full)
    assert tuple(full["encoder.down.1.block.0.nin_shortcut.weight"].shape) == (256, 128, 1, 1)


# ---------------------------------------------------------------------------------------- encode, decode
@pytest.mark.parametrize("batch", [1, 3])
def test_encode_decode_round_trip_on_random_weights(batch):
    tok = tiny()
    x = images(batch)
    ids = tok.encode(x)
    assert ids.shape == (batch, 256) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 64
    assert torch.equal(ids, tok.encode(torch.from_numpy(x))) and torch.equal(ids, tok.encode(x))
    out = tok.decode(ids)
    assert out.shape == (batch, 32, 32, 3) and out.dtype == torch.uint8
    assert torch.equal(out, tok.decode(ids)) and torch.equal(out, tok.decode(ids.numpy()))
    assert torch.equal(tok.encode(x[:1]), ids[:1]), "a row's tokens do not depend on the batch"
    # decode is the decoder of the quantised codes
    with torch.no_grad():
        z_q, ids_again = tok.quantize.quantize(tok.encode_latents(tok.from_pixels(torch.from_numpy(x))))
        assert torch.equal(ids_again.reshape(batch, -1), ids)
        assert torch.equal(tok.to_pixels(tok.decode_latents(z_q)), out)


def test_pixel_conventions_follow_showo():
    x = torch.arange(256, dtype=torch.uint8).view(1, 16, 16, 1).expand(1, 16, 16, 3)
    f = MagvitTokenizer.from_pixels(x)
    assert f.shape == (1, 3, 16, 16) and float(f.min()) == -1.0 and float(f.max()) == 1.0
    assert torch.equal(f, (x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5)  # ToTensor + Normalize(0.5, 0.5)
    back = MagvitTokenizer.to_pixels(f)
    assert int((back.int() - x.int()).abs().max()) <= 1  # truncated (Show-o's astype), so at most 1 below
    assert torch.equal(MagvitTokenizer.to_pixels(torch.tensor([-3.0, 3.0, 0.0]).view(1, 3, 1, 1)),
                       torch.tensor([[[[0, 255, 127]]]], dtype=torch.uint8))


def test_input_checks():
    tok = tiny()
    with pytest.raises(ValueError, match=r"\[B, 32, 32, 3\]"):
        tok.encode(images(1, side=16))
    with pytest.raises(TypeError, match="uint8"):
        tok.encode(images(1).astype(np.float32))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        tok.decode(torch.full((1, 256), 64))
    with pytest.raises(ValueError, match=r"\[B, 256\]"):
        tok.decode(torch.zeros(1, 255, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        tok.decode(torch.zeros(1, 256))


def test_training_forward_gives_gradients():
    tok = tiny().train()
    x = tok.from_pixels(torch.from_numpy(images(2)))
    recon, ids, losses = tok(x)
    assert recon.shape == x.shape and ids.shape == (2, 16, 16)
    (torch.nn.functional.mse_loss(recon, x) + losses.entropy_loss + losses.commitment_loss).backward()
    assert tok.encoder.conv_in.weight.grad is not None and torch.isfinite(tok.encoder.conv_in.weight.grad).all()


# ------------------------------------------------------------------------------------------ save, load
def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def test_save_load_round_trip_bit_exact(tmp_path):
    tok = tiny(seed=1)
    x = images(2, seed=4)
    ids = tok.encode(x)
    out = tok.decode(ids)
    directory = tok.save_pretrained(tmp_path / "magvit")
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((directory / "config.json").read_text())["_class_name"] == "MAGVITv2"
    for loaded in (MagvitTokenizer.from_pretrained(directory), MagvitTokenizer.load(directory),
                   MagvitTokenizer.load(directory / "model.safetensors"),
                   MagvitTokenizer.load(tok.save(tmp_path / "single.safetensors"))):
        assert loaded.config == tok.config and not loaded.training
        assert same_state(loaded, tok)
        assert torch.equal(loaded.encode(x), ids) and torch.equal(loaded.decode(ids), out)


def test_showo_layout_without_metadata_and_half_precision(tmp_path):
    """A converted Show-o checkpoint: model.safetensors with no fastface metadata (maybe fp16) + their config.json."""
    tok = tiny(seed=2)
    cfg = {"_class_name": "MAGVITv2", "_version": "0.0.1", **tok.config.to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in tok.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = MagvitTokenizer.from_pretrained(tmp_path)
    assert loaded.encoder.conv_in.weight.dtype == torch.float32
    assert torch.equal(loaded.encoder.conv_in.weight, tok.encoder.conv_in.weight.half().float())
    assert MagvitTokenizer.load(tmp_path / "model.safetensors").config == tok.config  # config.json beside the file
    bf16 = MagvitTokenizer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.decoder.conv_out.weight.dtype == torch.bfloat16 and bf16.decode(torch.zeros(1, 256, dtype=torch.long)
                                                                                ).shape == (1, 32, 32, 3)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "magvit.ckpt", "weights.pth"])
def test_pickle_checkpoints_are_refused_unopened(tmp_path, monkeypatch, name):
    def no_unpickling(*_, **__):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    (tmp_path / name).write_bytes(b"\x80\x04not really a pickle")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "MAGVITv2"}))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        MagvitTokenizer.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="pickle"):
        MagvitTokenizer.load(tmp_path / name)
    # a pickle renamed to model.safetensors is read as safetensors, fails, and is still never unpickled
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        MagvitTokenizer.from_pretrained(tmp_path)


def write_variant(tmp_path, change):
    tok = tiny(seed=3)
    state = {k: v.clone() for k, v in tok.state_dict().items()}
    change(state)
    (tmp_path / "config.json").write_text(json.dumps(tok.config.to_dict()))
    save_file(state, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("decoder.up.1.attn.0.q.weight"), "missing.*decoder.up.1.attn.0.q.weight"),
    (lambda s: s.update({"encoder.down.0.block.0.temb_proj.weight": torch.zeros(32, 512)}), "unexpected.*temb_proj"),
    (lambda s: s.update({"encoder.quant_conv.weight": torch.zeros(6, 6, 3, 3)}), "encoder.quant_conv.weight.*shape"),
    (lambda s: s["decoder.conv_out.bias"].fill_(float("nan")), "decoder.conv_out.bias.*non-finite"),
    (lambda s: s.update({"quantize.power_vals": s["quantize.power_vals"].int()}), "power_vals.*dtype"),
    (lambda s: s.update({"quantize.power_vals": s["quantize.power_vals"].flip(0).contiguous()}), "power_vals.*fixed"),
    (lambda s: s["quantize.embedding"][3].mul_(-1), "embedding.*fixed"),
])
def test_bad_checkpoints_raise_checkpoint_error(tmp_path, change, message):
    directory = write_variant(tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        MagvitTokenizer.from_pretrained(directory)


def test_bad_configs_and_missing_files(tmp_path):
    directory = tiny().save_pretrained(tmp_path / "ok")
    (directory / "config.json").write_text(json.dumps({"ch": 48}))
    with pytest.raises(CheckpointError, match="'ch'"):
        MagvitTokenizer.from_pretrained(directory)
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        MagvitTokenizer.from_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({"_class_name": "MAGVITv2"}))  # defaults: 95 M, not tiny
    with pytest.raises(CheckpointError, match="shape|missing|unexpected"):
        MagvitTokenizer.from_pretrained(directory)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        MagvitTokenizer.from_pretrained(directory)
    with pytest.raises(FileNotFoundError):
        MagvitTokenizer.load(tmp_path / "nowhere.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors.*missing"):
        MagvitTokenizer.from_pretrained(empty)


def test_lfq_tables():
    emb, powers = LFQ.code_table(3)
    assert powers.tolist() == [4, 2, 1]
    assert emb.tolist() == [[-1, -1, -1], [-1, -1, 1], [-1, 1, -1], [-1, 1, 1],
                            [1, -1, -1], [1, -1, 1], [1, 1, -1], [1, 1, 1]]
    assert math.log2(LFQ(13).codebook_size) == 13


# ------------------------------------------------------------------------ against Show-o's own source (optional)
SHOWO_SRC = os.environ.get("FASTFACE_SHOWO_SRC")  # a Show-o checkout (models/modeling_magvitv2.py, common_modules.py)


def showo_module(root, monkeypatch):
    """Show-o's models/modeling_magvitv2.py imported as it is, its heavy imports (accelerate, omegaconf, jaxtyping
    via modeling_utils and misc) replaced by stubs it does not use for these classes."""
    pkg = types.ModuleType("showo_models")
    pkg.__path__ = [os.path.join(root, "models")]
    utils = types.ModuleType("showo_models.modeling_utils")
    utils.ModelMixin, utils.ConfigMixin, utils.register_to_config = torch.nn.Module, object, lambda f: f
    misc = types.ModuleType("showo_models.misc")
    misc.List = list
    for name, mod in (("showo_models", pkg), ("showo_models.modeling_utils", utils), ("showo_models.misc", misc)):
        monkeypatch.setitem(sys.modules, name, mod)
    for name in ("common_modules", "modeling_magvitv2"):
        path = os.path.join(root, "models", f"{name}.py")
        spec = importlib.util.spec_from_file_location(f"showo_models.{name}", path)
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, mod)
        spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not SHOWO_SRC, reason="set FASTFACE_SHOWO_SRC to a Show-o checkout")
def test_matches_showo_source(monkeypatch):
    pytest.importorskip("einops")  # their common_modules imports it
    showo = showo_module(SHOWO_SRC, monkeypatch)

    def reference(cfg):
        m = torch.nn.Module()
        shared = dict(ch=cfg.ch, attn_resolutions=list(cfg.attn_resolutions), resolution=cfg.resolution,
                      z_channels=cfg.z_channels)
        m.encoder = showo.VQGANEncoder(ch_mult=list(cfg.encoder_ch_mult),
                                       num_res_blocks=list(cfg.encoder_num_res_blocks), **shared)
        m.decoder = showo.VQGANDecoder(ch_mult=list(cfg.decoder_ch_mult),
                                       num_res_blocks=list(cfg.decoder_num_res_blocks), **shared)
        m.quantize = showo.LFQuantizer(codebook_dim=cfg.token_size)
        return m

    with torch.device("meta"):  # the defaults: same keys, order, shapes and dtypes as their MAGVITv2
        ref_sd, our_sd = showo.MAGVITv2().state_dict(), MagvitTokenizer().state_dict()
    assert list(ref_sd) == list(our_sd)
    assert all(ref_sd[k].shape == our_sd[k].shape and ref_sd[k].dtype == our_sd[k].dtype for k in ref_sd)
    tok = tiny(seed=5, encoder_num_res_blocks=(2, 1), decoder_num_res_blocks=(1, 2))
    ref = reference(tok.config).eval()
    ref.load_state_dict(tok.state_dict(), strict=True)
    x = torch.from_numpy(images(2, seed=6))
    with torch.no_grad():
        z = ref.encoder(tok.from_pixels(x))
        assert_close(tok.encode_latents(tok.from_pixels(x)), z, atol=1e-5, rtol=1e-5)
        out = ref.quantize(z)
        ids = out["indices"].reshape(2, -1)
        assert torch.equal(tok.encode(x), ids)
        losses = tok.quantize.losses(z)
        assert_close(losses.entropy_loss, out["entropy_loss"], atol=1e-6, rtol=1e-5)
        assert_close(losses.commitment_loss, out["quantizer_loss"], atol=1e-6, rtol=1e-5)
        pixels = ref.decoder(ref.quantize.get_codebook_entry(ids))["output"]
        pixels = (torch.clamp((pixels + 1.0) / 2.0, min=0.0, max=1.0) * 255.0).permute(0, 2, 3, 1)
        assert int((tok.decode(ids).int() - torch.from_numpy(pixels.numpy().astype(np.uint8)).int()).abs().max()) <= 1
