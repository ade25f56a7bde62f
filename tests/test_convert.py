"""fastface convert showo: a Show-o checkpoint directory (written here from transformers' PhiForCausalLM with random
weights, in Show-o's layout) becomes a fastface checkpoint whose logits equal transformers'."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

import fastface
from fastface.cli import main
from fastface.convert import SHOWO_SPECIALS, convert_showo
from fastface.weights import CheckpointError

transformers = pytest.importorskip("transformers")


def write_showo(src, *, text=60, codes=32, vq_tokens=16, hidden=64, layers=2, heads=4, ffn=128, seed=0):
    """A Show-o checkpoint directory: config.json, model.safetensors ("showo." + Phi keys), tokenizer.json, and the
    backbone's PhiConfig json beside it. Returns (the transformers model, the PhiConfig json path)."""
    torch.manual_seed(seed)
    eos = text - 1
    vocab = text + len(SHOWO_SPECIALS) + codes + 1
    phi_config = transformers.PhiConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                        num_hidden_layers=layers, num_attention_heads=heads,
                                        partial_rotary_factor=0.5, bos_token_id=eos, eos_token_id=eos)
    hf = transformers.PhiForCausalLM(phi_config).eval()
    with torch.no_grad():  # non-trivial biases and norms (the defaults are 0 and 1)
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    src.mkdir(parents=True)
    save_file({f"showo.{k}": v.contiguous() for k, v in hf.state_dict().items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({
        "_class_name": "Showo", "_version": "0.0.1", "w_clip_vit": False, "vocab_size": vocab,
        "llm_vocab_size": text, "llm_model_path": "microsoft/phi-1_5", "codebook_size": codes,
        "num_vq_tokens": vq_tokens, "load_from_showo": False, "mask_token_id": vocab - 1}))
    words = {f"w{i}": i for i in range(text - 1)}
    words["<|endoftext|>"] = eos
    tok = Tokenizer(WordLevel(words, unk_token="<|endoftext|>"))
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(src / "tokenizer.json"))
    phi_json = src.parent / "phi.json"
    phi_json.write_text(phi_config.to_json_string())
    return hf, phi_json


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("shape", [dict(), dict(hidden=96, heads=6, ffn=200, layers=3, vq_tokens=64)])
def test_converted_logits_equal_transformers(tmp_path, shape, capsys):
    hf, phi_json = write_showo(tmp_path / "showo", **shape)
    assert main(["convert", "showo", str(tmp_path / "showo"), str(tmp_path / "ff"),
                 "--backbone-config", str(phi_json)]) == 0
    assert "wrote" in capsys.readouterr().out
    pipe = fastface.load(tmp_path / "ff", backend="reference")
    cfg = pipe.config
    assert cfg.vocab_size == hf.config.vocab_size and cfg.mask_token_id == hf.config.vocab_size - 1
    assert cfg.pad_id == 60 and cfg.soi_id == 61 and cfg.eoi_id == 62 and cfg.t2i_id == 65 and cfg.eos_id == 59
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 60, (3, 11), generator=gen)  # text ids: a causal text sequence
    with torch.no_grad():
        want = hf(ids).logits
    got = pipe.logits(ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert _rel_err(got, want) < 1e-5
    # the tokenizer carries Show-o's tokens after the backbone's, as special tokens
    assert [pipe.tokenizer.token_to_id(t) for t in SHOWO_SPECIALS] == list(range(60, 70))


def test_phi_1_5_real_widths(tmp_path):
    """Phi-1.5's real widths (hidden 2048, 32 heads, MLP 8192, Show-o's 58498 ids), 2 layers, no --backbone-config
    beyond the layer count."""
    hf, phi_json = write_showo(tmp_path / "showo", text=50295, codes=8192, vq_tokens=256, hidden=2048, layers=2,
                               heads=32, ffn=8192)
    (tmp_path / "phi.json").write_text(json.dumps({"model_type": "phi", "num_hidden_layers": 2,
                                                   "bos_token_id": 50294, "eos_token_id": 50294}))
    dst = convert_showo(tmp_path / "showo", tmp_path / "ff", backbone_config=tmp_path / "phi.json")
    (tmp_path / "showo" / "model.safetensors").unlink()
    pipe = fastface.load(dst, backend="reference")
    assert pipe.config.vocab_size == 58498 and pipe.config.image_tokens == 256
    ids = torch.randint(0, 50295, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(ids).logits
    assert _rel_err(pipe.logits(ids), want) < 1e-5


def test_logits_checks_its_ids(tmp_path):
    write_showo(tmp_path / "showo")
    pipe = fastface.load(convert_showo(tmp_path / "showo", tmp_path / "ff",
                                       backbone_config=tmp_path / "phi.json"), backend="reference")
    with pytest.raises(TypeError, match="LongTensor"):
        pipe.logits(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="must lie in"):
        pipe.logits(torch.tensor([[0, pipe.config.vocab_size]]))
    with pytest.raises(ValueError, match="at least one"):
        pipe.logits(torch.zeros(1, 0, dtype=torch.long))
    # a row with an image segment runs under omni-attention: the text before it is causal; <soi> and the image
    # positions see the whole segment, so from <soi> on the logits differ from a causal forward
    c = pipe.config
    row = torch.tensor([[c.t2i_id, 5, 6, c.soi_id, *(c.image_token_offset + torch.arange(16)).tolist(), c.eoi_id]])
    omni = pipe.logits(row)
    causal = pipe.model.causal_logits(row).float()
    assert torch.equal(omni[:, :3], causal[:, :3])
    assert not torch.allclose(omni[:, 3:-1], causal[:, 3:-1], atol=1e-3)


# ------------------------------------------------------------------------------------------- bad Show-o input
def _convert(tmp_path, **kw):
    return convert_showo(tmp_path / "showo", tmp_path / "ff", backbone_config=tmp_path / "phi.json", **kw)


def test_truncated_safetensors(tmp_path):
    write_showo(tmp_path / "showo")
    f = tmp_path / "showo" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
        _convert(tmp_path)


def _rewrite(tmp_path, fn):
    from safetensors.torch import load_file

    f = tmp_path / "showo" / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f))


def test_renamed_missing_and_extra_keys(tmp_path):
    write_showo(tmp_path / "showo")
    _rewrite(tmp_path, lambda t: t.update({"showo.model.layers.0.mlp.fc9.weight": t.pop(
        "showo.model.layers.0.mlp.fc1.weight")}))
    with pytest.raises(CheckpointError, match="missing 'model.layers.0.mlp.fc1.weight'"):
        _convert(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"showo.model.layers.0.mlp.fc1.weight": t.pop(
        "showo.model.layers.0.mlp.fc9.weight"), "mm_projector.0.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match="outside the Show-o module.*mm_projector"):
        _convert(tmp_path)
    _rewrite(tmp_path, lambda t: (t.pop("mm_projector.0.weight"), t.update({"showo.extra.weight": torch.zeros(2)})))
    with pytest.raises(CheckpointError, match="no place in the model.*extra.weight"):
        _convert(tmp_path)


def test_wrong_shapes(tmp_path):
    write_showo(tmp_path / "showo")
    _rewrite(tmp_path, lambda t: t.update({"showo.lm_head.weight": t["showo.lm_head.weight"][:-1].clone()}))
    with pytest.raises(CheckpointError, match="'lm_head.weight' has shape"):
        _convert(tmp_path)


def test_pickle_is_refused_never_loaded(tmp_path, monkeypatch):
    write_showo(tmp_path / "showo")
    (tmp_path / "showo" / "model.safetensors").unlink()
    (tmp_path / "showo" / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")

    def forbidden(*a, **k):
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr("pickle.load", forbidden)
    with pytest.raises(CheckpointError, match="only pickle checkpoints \\(pytorch_model.bin\\).*never unpickles"):
        _convert(tmp_path)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(llm_model_path="meta-llama/Llama-2-7b"), "does not name Phi-1.5"),
    (lambda c: c.update(w_clip_vit=True), "w_clip_vit"),
    (lambda c: c.update(vocab_size=c["vocab_size"] + 1), "special tokens"),
    (lambda c: c.update(num_vq_tokens=15), "not a square grid"),
    (lambda c: c.update(codebook_size="big"), "'codebook_size' must be a positive int"),
    (lambda c: c.update(wings=2), "unknown Show-o config field"),
])
def test_bad_showo_configs(tmp_path, edit, match):
    write_showo(tmp_path / "showo")
    cfg = json.loads((tmp_path / "showo" / "config.json").read_text())
    edit(cfg)
    (tmp_path / "showo" / "config.json").write_text(json.dumps(cfg))
    backbone = None if "Phi-1.5" in match else tmp_path / "phi.json"  # the Phi-1.5 check needs no backbone config
    with pytest.raises(CheckpointError, match=match):
        convert_showo(tmp_path / "showo", tmp_path / "ff", backbone_config=backbone)


@pytest.mark.parametrize("field,value,match", [
    ("model_type", "llama", "model_type 'llama'"), ("hidden_act", "relu", "hidden_act"),
    ("qk_layernorm", True, "qk_layernorm"), ("num_key_value_heads", 2, "grouped-query"),
])
def test_a_backbone_other_than_phi_is_refused(tmp_path, field, value, match):
    write_showo(tmp_path / "showo")
    phi = json.loads((tmp_path / "phi.json").read_text())
    phi[field] = value
    (tmp_path / "phi.json").write_text(json.dumps(phi))
    with pytest.raises(CheckpointError, match=match):
        _convert(tmp_path)


def test_cli_errors_are_one_line(tmp_path, capsys):
    write_showo(tmp_path / "showo")
    (tmp_path / "showo" / "tokenizer.json").unlink()
    assert main(["convert", "showo", str(tmp_path / "showo"), str(tmp_path / "ff"),
                 "--backbone-config", str(tmp_path / "phi.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tokenizer" in err[0] and "Traceback" not in err[0]


def test_converted_model_engine_equals_reference(tmp_path):
    """Show-o's ids (pad, <|t2i|>, <|soi|>, <|eoi|> and <|endoftext|> where fastface's own layout has 0..7) run
    through the engine exactly as through the reference loops: image tokens and answers, fp32, token for token."""
    hf, _ = write_showo(tmp_path / "showo")
    with torch.no_grad():
        hf.lm_head.weight.mul_(20)  # sharp logits: decoding is not uniform noise
        save_file({f"showo.{k}": v.contiguous() for k, v in hf.state_dict().items()},
                  str(tmp_path / "showo" / "model.safetensors"))
    dst = _convert(tmp_path)
    ref, fast = fastface.load(dst, backend="reference"), fastface.load(dst, backend="auto")
    prompts = ["w1 w2 w3", "w7", "w4 w5 w6 w8 w9 w10"]
    for guidance in (0.0, 2.0):
        want = ref.generate_tokens(prompts, steps=4, guidance=guidance, seed=3)
        got = fast.generate_tokens(prompts, steps=4, guidance=guidance, seed=3)
        assert torch.equal(got, want) and len(set(want.flatten().tolist())) > 1
    image = want
    questions = ["w11 w12", "w13", "w14 w15 w16"]
    assert fast.answer(image, questions, max_new_tokens=5) == ref.answer(image, questions, max_new_tokens=5)


def test_with_the_magvit_tokenizer_images_come_back(tmp_path):
    """--vq: Show-o's MAGVIT-v2 tokenizer rides along; the converted pipeline draws images and reads them."""
    from fastface.vq.magvit import MagvitTokenizer

    vq = MagvitTokenizer.from_name("tiny").eval()  # 32 px -> 16 x 16 = 256 tokens of 64 codes
    vq.save_pretrained(tmp_path / "magvit")
    write_showo(tmp_path / "showo", codes=64, vq_tokens=256)
    assert main(["convert", "showo", str(tmp_path / "showo"), str(tmp_path / "ff"), "--backbone-config",
                 str(tmp_path / "phi.json"), "--vq", str(tmp_path / "magvit")]) == 0
    pipe = fastface.load(tmp_path / "ff")
    assert isinstance(pipe.image_tokenizer, MagvitTokenizer) and pipe.config.image_size == 32
    state, again = vq.state_dict(), pipe.image_tokenizer.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    images = pipe.generate(["w1 w2"], steps=2, seed=0)
    assert images[0].size == (32, 32)
    assert pipe.encode_images(images).shape == (1, 256)


def test_a_magvit_that_does_not_fit_is_refused(tmp_path):
    from fastface.vq.magvit import MagvitTokenizer

    MagvitTokenizer.from_name("tiny").save_pretrained(tmp_path / "magvit")
    write_showo(tmp_path / "showo")  # 16 tokens of 32 codes: not the tokenizer's 256 of 64
    with pytest.raises(CheckpointError, match="256 tokens of 64 codes.*num_vq_tokens 16, codebook_size 32"):
        _convert(tmp_path, vq=tmp_path / "magvit")
