"""Reference model: omni-attention masks, sequence-level MoE, mixed batches, config.

The token-level grouped MoE op (its reference, routing, the load-balancing loss) is tested in
tests/test_op_grouped_moe.py.
"""

import pytest
import torch

from fastface.config import (
    BOS_ID,
    EOI_ID,
    EOS_ID,
    GROUP_GENERATION,
    GROUP_UNDERSTANDING,
    MMU_ID,
    PAD_ID,
    SOI_ID,
    T2I_ID,
    FaceConfig,
)
from fastface.model import FaceTransformer, omni_attention_mask
from fastface.prompts import mmu_prompt_ids, t2i_prompt_ids, t2i_sequence
from fastface.testing import assert_close

CFG = FaceConfig.from_name("tiny")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = FaceTransformer(CFG).eval()
    model.reset_parameters(seed)
    return model


def t2i_ids(texts, image_ids):
    return t2i_sequence(t2i_prompt_ids(texts, CFG), image_ids, CFG)


# ----------------------------------------------------------------------------------------- masks

def test_omni_mask_t2i():
    N = CFG.image_tokens
    ids = t2i_ids([[9, 10, 11]], torch.full((1, N), CFG.mask_token_id))[0]
    mask = omni_attention_mask(ids[None])[0]
    L = ids.shape[0]
    is_pad = ids == PAD_ID
    soi = int((ids == SOI_ID).nonzero()[0])
    eoi = int((ids == EOI_ID).nonzero()[0])
    image = torch.zeros(L, dtype=torch.bool)
    image[soi : eoi + 1] = True
    for i in range(L):
        if is_pad[i]:
            assert mask[i].tolist() == [j == i for j in range(L)], "a pad row attends only to itself"
            continue
        for j in range(L):
            if is_pad[j]:
                assert not mask[i, j], f"row {i} sees pad column {j}"
            elif image[i]:
                assert mask[i, j] == (j <= eoi), f"image row {i} must see the prefix and the whole segment ({j})"
            else:
                assert mask[i, j] == (j <= i), f"text row {i} must be causal ({j})"
                if image[j]:
                    assert not mask[i, j], "a text row of the prompt never sees an image column"


def test_omni_mask_mmu_text_after_image_sees_image():
    img = torch.randint(0, CFG.codebook_size, (1, CFG.image_tokens))
    ids = mmu_prompt_ids(img, [[20, 21, 22]], CFG)[0]
    mask = omni_attention_mask(ids[None])[0]
    soi = int((ids == SOI_ID).nonzero()[0])
    eoi = int((ids == EOI_ID).nonzero()[0])
    last = ids.shape[0] - 1
    assert mask[last, soi : eoi + 1].all(), "question tokens see the whole image"
    assert mask[soi + 1, soi : eoi + 1].all(), "image rows are bidirectional"
    assert not mask[soi + 1, eoi + 1 :].any(), "image rows never see the question that follows"
    assert mask[soi + 1, : soi].all()


def test_pads_never_change_outputs():
    """Left padding: the same prompt with more padding gives the same logits at real positions."""
    model = tiny_model()
    img = torch.randint(0, CFG.codebook_size, (1, CFG.image_tokens)) + CFG.image_token_offset
    a = t2i_ids([[9, 10, 11]], img)
    short = t2i_ids([[9]], img)
    longer = t2i_ids([[12, 13, 14, 9]], img)  # different text -> different logits, sanity
    task = torch.tensor([GROUP_GENERATION])
    with torch.no_grad():
        la, ls, ll = (model(x, task).logits for x in (a, short, longer))
    assert not torch.allclose(ls[0, -3:], ll[0, -3:]), "the prompt must matter"
    # a batch with a differently padded neighbour gives the same rows
    batch = torch.cat([a, short])
    with torch.no_grad():
        lb = model(batch, torch.tensor([1, 1])).logits
    assert_close(lb[0], la[0], atol=1e-5, rtol=1e-5, name="row 0 in batch")
    assert_close(lb[1], ls[0], atol=1e-5, rtol=1e-5, name="row 1 in batch")


def test_text_prefix_independent_of_image_tokens():
    """In t2i the prompt rows never see the image, so their hidden states do not depend on it."""
    model = tiny_model()
    task = torch.tensor([GROUP_GENERATION])
    img1 = torch.randint(0, CFG.codebook_size, (1, CFG.image_tokens)) + CFG.image_token_offset
    img2 = torch.full_like(img1, CFG.mask_token_id)
    with torch.no_grad():
        o1 = model(t2i_ids([[9, 10]], img1), task, return_hidden=True)
        o2 = model(t2i_ids([[9, 10]], img2), task, return_hidden=True)
    P = CFG.max_text_len  # <soi> opens the bidirectional image segment, so the prefix ends before it
    assert_close(o1.hidden[:, :P], o2.hidden[:, :P], atol=1e-6, rtol=1e-6, name="prompt hidden states")
    assert not torch.allclose(o1.hidden[:, P:], o2.hidden[:, P:])


# ----------------------------------------------------------------------------------------- sequence MoE

def test_seq_router_decision_fixed_when_only_image_tokens_change():
    model = tiny_model(1)
    task = torch.tensor([GROUP_GENERATION, GROUP_GENERATION])
    prompt = [[9, 10, 11], [30, 31]]
    routes = []
    for trial in range(3):
        img = torch.randint(0, CFG.codebook_size, (2, CFG.image_tokens)) + CFG.image_token_offset
        if trial == 0:
            img[:] = CFG.mask_token_id
        with torch.no_grad():
            routes.append(model(t2i_ids(prompt, img), task).routes)
    for layer in range(CFG.num_layers):
        for r in routes[1:]:
            assert torch.equal(r[layer][1], routes[0][layer][1]), "expert choice changed with the image"
            assert torch.equal(r[layer][0], routes[0][layer][0]), "expert weights changed with the image"


def test_seq_moe_experts_semantics():
    model = tiny_model(2)
    seq = model.layers[0].seq_moe
    h = torch.randn(2, 5, CFG.hidden_size)
    e_sem, e_id = torch.randn(2, CFG.sem_dim), torch.randn(2, CFG.id_dim)
    group = torch.tensor([GROUP_UNDERSTANDING, GROUP_GENERATION])
    # understanding experts: semantic (0), identity (1); generation: zero (1), noise (2 -> copy at inference)
    route = (torch.tensor([[0.75, 0.25], [0.5, 0.5]]), torch.tensor([[0, 1], [1, 2]]))
    with torch.no_grad():
        out, _ = seq(h, group, None, e_sem, e_id, route)
    want0 = 0.75 * (h[0] + seq.sem_proj(e_sem[0])) + 0.25 * (h[0] + seq.id_proj(e_id[0]))
    assert_close(out[0], want0, atol=1e-6, rtol=1e-6, name="semantic+identity")
    assert_close(out[1], 0.5 * h[1], atol=1e-6, rtol=1e-6, name="zero+noise(inference)")
    with torch.no_grad():
        out_absent, _ = seq(h, group, None, None, None, route)
    assert_close(out_absent[0], h[0], atol=1e-6, rtol=1e-6, name="absent embeddings act as copy")


def test_mixed_batch_forward_matches_separate():
    model = tiny_model(3)
    img = torch.randint(0, CFG.codebook_size, (1, CFG.image_tokens))
    t2i = t2i_ids([[9, 10]], img + CFG.image_token_offset)
    mmu = mmu_prompt_ids(img, [[20, 21]], CFG)
    L = max(t2i.shape[1], mmu.shape[1])
    pad = lambda x: torch.cat([torch.full((1, L - x.shape[1]), PAD_ID), x], dim=1)  # noqa: E731
    batch = torch.cat([pad(t2i), pad(mmu)])
    with torch.no_grad():
        both = model(batch, torch.tensor([GROUP_GENERATION, GROUP_UNDERSTANDING])).logits
        a = model(t2i, torch.tensor([GROUP_GENERATION])).logits
        b = model(mmu, torch.tensor([GROUP_UNDERSTANDING])).logits
    assert_close(both[0, -t2i.shape[1]:], a[0], atol=1e-5, rtol=1e-5, name="t2i row of mixed batch")
    assert_close(both[1, -mmu.shape[1]:], b[0], atol=1e-5, rtol=1e-5, name="mmu row of mixed batch")


def test_aux_loss_in_training_and_gradients_flow():
    model = tiny_model(4).train()
    img = torch.randint(0, CFG.codebook_size, (2, CFG.image_tokens)) + CFG.image_token_offset
    out = model(t2i_ids([[9, 10], [11]], img), torch.tensor([1, 1]))
    assert out.aux_loss > 0
    (out.logits.float().square().mean() + out.aux_loss).backward()
    for name, p in model.named_parameters():
        if "sem_proj" in name or "id_proj" in name:
            continue  # no embeddings given
        assert p.grad is not None, f"no gradient for {name}"


def test_specials_layout():
    assert (PAD_ID, BOS_ID, EOS_ID, T2I_ID, MMU_ID, SOI_ID, EOI_ID) == (0, 1, 2, 3, 4, 5, 6)
    assert CFG.mask_token_id == CFG.text_vocab_size + CFG.codebook_size == CFG.vocab_size - 1
    assert EOS_ID == 2


@pytest.mark.parametrize("name", ["tiny", "face-s", "showo-256", "showo-512", "unif2ace-2b"])
def test_presets(name):
    cfg = FaceConfig.from_name(name)
    assert cfg.hidden_size % cfg.num_heads == 0
    if name.startswith("showo"):  # Show-o's shapes: Phi-1.5 over 58498 ids; 256 or 1024 image tokens
        assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.dense_ffn_size, cfg.vocab_size) == \
            (2048, 24, 32, 8192, 58498)
        assert cfg.image_tokens == {"showo-256": 256, "showo-512": 1024}[name]
    if name == "unif2ace-2b":  # the paper's size, in bf16 well inside this machine's 24 GiB
        assert 1.7e9 < cfg.num_parameters() < 1.9e9 and cfg.top_k == 4 and cfg.num_shared_experts == 1
        assert cfg.num_parameters() * 2 < 8 * 2**30
    if name == "face-s":
        assert cfg.image_tokens == 256 and cfg.image_size == 64
        assert cfg.num_parameters() * 2 < 30e6, "face-s must ship under 30 MB in bf16"


def test_config_errors():
    with pytest.raises(ValueError, match="preset"):
        FaceConfig.from_name("huge")
    with pytest.raises(ValueError, match="unknown config field"):
        FaceConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="top_k"):
        FaceConfig(top_k=9)
    with pytest.raises(ValueError, match="hidden_size"):
        FaceConfig(hidden_size=30, num_heads=4)
