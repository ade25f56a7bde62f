"""The face-text contrastive model and the understanding embeddings (e_sem, e_id): the loss and retrieval metrics
against explicit computations, files and their errors, training and exact resume, the embeddings in transformer
training (batches, RSC) and in the pipeline (engine == reference with embeddings, a request alone == in a batch),
and the shipped model on fresh held-out faces."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastface.config import FaceConfig
from fastface.facetext.model import (
    DEFAULT_PATH,
    FaceText,
    FaceTextConfig,
    FaceTextModel,
    contrastive_loss,
    pad_ids,
    tower_features,
)
from fastface.facetext.train import FaceTextTrainSettings, held_out, retrieval, run_model, train_facetext
from fastface.perception.faceptor import Faceptor
from fastface.perception.perceptor import Perceptor
from fastface.tokenizer import default_text_tokenizer
from fastface.weights import CheckpointError

shipped = pytest.mark.skipif(not DEFAULT_PATH.is_file(), reason="no shipped face-text model")


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    return Faceptor.from_name("tiny").eval()


def tiny_facetext(tower, vocab_size: int, embed_dim: int = 8) -> FaceText:
    torch.manual_seed(1)
    return FaceText.from_name("tiny", vocab_size=vocab_size, embed_dim=embed_dim,
                              image_queries=len(tower.config.attributes), image_dim=tower.config.dim).eval()


@pytest.fixture(scope="module")
def faces():
    from fastface.data.dataset import make_dataset

    return make_dataset(24, seed=7, captions=True)


@pytest.fixture
def saved(tmp_path, tower):
    """A tiny face-text model on disk with its tower and tokenizer beside it -> its path."""
    tok = default_text_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    tower_file = Perceptor(tower).save(tmp_path / "faceptor.safetensors")
    ft = FaceTextModel(tiny_facetext(tower, tok.get_vocab_size()), tower, tok)
    return ft.save(tmp_path / "facetext.safetensors", tower_path=tower_file)


# ------------------------------------------------------------------------------------- loss and metrics

def test_contrastive_loss_is_symmetric_infonce():
    gen = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 4, generator=gen), dim=1)
    txt = F.normalize(torch.randn(5, 4, generator=gen), dim=1)
    scale = torch.tensor(7.0)
    logits = (scale * img @ txt.T).double()
    i2t = -torch.log_softmax(logits, 1).diagonal().mean()
    t2i = -torch.log_softmax(logits, 0).diagonal().mean()
    assert float(contrastive_loss(img, txt, scale)) == pytest.approx(float(0.5 * (i2t + t2i)), rel=1e-5)


def test_retrieval_counts_ranks_both_ways():
    e = torch.eye(4)
    r = retrieval(e, e, ks=(1, 2))
    assert r["text_to_image"]["R@1"] == 1.0 and r["image_to_text"]["R@1"] == 1.0
    # text 0 = [0.5, 0.9, 0, 0]: image 1 scores it 0.9 > its own image's 0.5 -> text 0 finds its face second;
    # every image still ranks its own caption first (image 1: 1.0 for text 1 beats 0.9 for text 0)
    text = torch.eye(4)
    text[0] = torch.tensor([0.5, 0.9, 0.0, 0.0])
    r = retrieval(torch.eye(4), text, ks=(1, 2))
    assert r["text_to_image"]["R@1"] == 0.75 and r["text_to_image"]["R@2"] == 1.0
    assert r["image_to_text"]["R@1"] == 1.0 and r["text_to_image"]["median_rank"] == 1.0


def test_pad_ids_cuts_pads_and_keeps_empty_rows_defined():
    ids, mask = pad_ids([[5, 6, 7], [], [9] * 10], max_len=4)
    assert ids.shape == (3, 4) and mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert ids[2].tolist() == [9, 9, 9, 9]


def test_text_embedding_ignores_padding(tower):
    ft = tiny_facetext(tower, 64)
    a, ma = pad_ids([[9, 10, 11]], 16)
    b, mb = pad_ids([[9, 10, 11], [12] * 9], 16)
    torch.testing.assert_close(ft.text(a, ma)[0], ft.text(b, mb)[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- files

def test_save_load_round_trip(saved, faces):
    ft = FaceTextModel.load(saved)
    again = FaceTextModel.load(saved)
    torch.testing.assert_close(ft.embed_images(faces["images"][:4]), again.embed_images(faces["images"][:4]))
    cfg = json.loads(saved.with_suffix(".json").read_text())
    assert cfg["image_tower"] == "faceptor.safetensors" and len(cfg["image_tower_sha256"]) == 64


def test_a_retrained_tower_is_refused(saved, tower):
    torch.manual_seed(9)
    Perceptor(Faceptor.from_name("tiny")).save(saved.parent / "faceptor.safetensors")
    with pytest.raises(CheckpointError, match="not the Faceptor this model was trained on"):
        FaceTextModel.load(saved)


def test_missing_files_and_bad_configs(saved, tmp_path):
    (saved.parent / "faceptor.safetensors").unlink()
    with pytest.raises(CheckpointError, match="image tower"):
        FaceTextModel.load(saved)
    with pytest.raises(FileNotFoundError, match="no face-text weights"):
        FaceTextModel.load(tmp_path / "nothing.safetensors")
    for bad in (dict(text_width=10, text_heads=4), dict(embed_dim=0), dict(image_tower="../x.safetensors"),
                dict(metrics=[])):
        with pytest.raises(ValueError):
            FaceTextConfig(**bad)
    with pytest.raises(ValueError, match="unknown FaceTextConfig field"):
        FaceTextConfig.from_dict({"embed_dim": 8, "colour": 1})


def test_bad_inputs_name_the_problem(saved):
    ft = FaceTextModel.load(saved)
    with pytest.raises(ValueError, match="empty"):
        ft.embed_images([])
    with pytest.raises(ValueError, match="grayscale"):
        ft.embed_images([np.zeros((64, 64), np.uint8)])
    with pytest.raises(ValueError, match="64x64|shape"):
        ft.embed_images(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="texts is empty"):
        ft.embed_texts([])
    with pytest.raises(TypeError):
        ft.embed_texts([3])


# ------------------------------------------------------------------------------------------- embeddings

def test_understanding_embeddings_are_the_towers(saved, faces):
    ft = FaceTextModel.load(saved)
    images = faces["images"][:6]
    e_sem, e_id = ft.understanding_embeddings(images)
    assert e_sem.shape == (6, 8) and e_id.shape == (6, ft.id_dim)
    torch.testing.assert_close(e_sem.norm(dim=1), torch.ones(6))
    # e_id is the perception model's identity output; e_sem the head over the unfused tower's attribute queries
    torch.testing.assert_close(e_id, Perceptor(ft.tower).embed_identity(images), rtol=1e-4, atol=1e-5)
    x = ft.tower.to_input(torch.from_numpy(images))
    with torch.no_grad():
        want = ft.model.embed_features(tower_features(ft.tower, x))
    torch.testing.assert_close(e_sem, want, rtol=1e-4, atol=1e-5)
    sim = ft.similarity(images, ["a man", "a woman with red hair"])
    assert sim.shape == (6, 2) and float(sim.abs().max()) <= 1 + 1e-5


# ------------------------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def train_files(tmp_path_factory, tower):
    d = tmp_path_factory.mktemp("ft-train")
    default_text_tokenizer().save(str(d / "tokenizer.json"))
    Perceptor(tower).save(d / "faceptor.safetensors")
    return d


def _settings(d, **kw):
    base = dict(preset="tiny", steps=30, batch_size=8, lr=3e-3, warmup=2, faces=24, save_every=10, log_every=10,
                tower=str(d / "faceptor.safetensors"), tokenizer=str(d / "tokenizer.json"))
    return FaceTextTrainSettings(**{**base, **kw})


def test_training_lowers_the_loss_and_resumes_exactly(train_files, faces, tmp_path):
    logs = []
    full = train_facetext(_settings(train_files), tmp_path / "a", data=faces, log=logs.append)
    curve = [json.loads(line)["loss"] for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert curve[-1] < curve[0], curve
    train_facetext(_settings(train_files), tmp_path / "b", data=faces, stop_at=13, log=logs.append)
    resumed = train_facetext(_settings(train_files), tmp_path / "b", data=faces, log=logs.append)
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(run_model(tmp_path / "b").model.text.pos, resumed.model.text.pos)
    with pytest.raises(ValueError, match="other settings"):
        train_facetext(_settings(train_files, lr=1e-2), tmp_path / "b", data=faces, log=logs.append)


def test_train_settings_are_checked(train_files):
    with pytest.raises(ValueError, match="batch_size"):
        _settings(train_files, **{"batch_size": 1})
    with pytest.raises(ValueError, match="preset"):
        FaceTextTrainSettings(preset="huge")


# ----------------------------------------------------------------------------- the transformer side

@pytest.fixture
def embedded_checkpoint(tmp_path, tower):
    """A tiny transformer checkpoint with a tiny image tokenizer and an embedder (e_sem, e_id of width 8), its
    semantic and identity projections scaled so that the embeddings move the logits."""
    from fastface.checkpoint import save_checkpoint
    from fastface.model import FaceTransformer
    from fastface.vq import VQModel

    cfg = FaceConfig.from_name("tiny", text_vocab_size=256)
    tok = default_text_tokenizer(256)
    torch.manual_seed(0)
    model = FaceTransformer(cfg)
    model.reset_parameters(5)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
        for layer in model.layers:
            layer.seq_moe.sem_proj.weight.mul_(30)
            layer.seq_moe.id_proj.weight.mul_(30)
    torch.manual_seed(2)
    vq = VQModel.from_name("tiny", channels=(4, 4, 4, 4, 8), enc_blocks=(0,) * 5, dec_blocks=(0,) * 5,
                           codebook_size=cfg.codebook_size, code_dim=8).eval()
    embedder = FaceTextModel(tiny_facetext(tower, 256), tower, tok)
    return save_checkpoint(tmp_path / "ckpt", model, tok, vq, embedder=embedder)


def test_checkpoint_keeps_its_embedder(embedded_checkpoint, faces):
    import fastface
    from fastface.checkpoint import TOWER_FILE, load_checkpoint, load_embedder

    cfg = json.loads((embedded_checkpoint / "config.json").read_text())
    assert cfg["embedder"] == "facetext.safetensors"
    # the embedder's locked tower has a file of its own, apart from a perception model the directory may ship
    tower_cfg = json.loads((embedded_checkpoint / "facetext.json").read_text())
    assert tower_cfg["image_tower"] == TOWER_FILE == "facetext_tower.safetensors"
    assert (embedded_checkpoint / TOWER_FILE).is_file() and not (embedded_checkpoint / "faceptor.safetensors").exists()
    _, _, _, config = load_checkpoint(embedded_checkpoint)
    emb = load_embedder(embedded_checkpoint, config)
    pipe = fastface.load(embedded_checkpoint, backend="reference")
    torch.testing.assert_close(pipe.embedder.embed_images(faces["images"][:2]), emb.embed_images(faces["images"][:2]))


def test_a_bad_embedder_field_is_refused(embedded_checkpoint):
    from fastface.checkpoint import read_config

    path = embedded_checkpoint / "config.json"
    cfg = json.loads(path.read_text())
    for bad in ("../elsewhere.safetensors", 7, ""):
        path.write_text(json.dumps({**cfg, "embedder": bad}))
        with pytest.raises(CheckpointError, match="embedder"):
            read_config(embedded_checkpoint)


def test_answers_read_the_embeddings_and_engine_matches_reference(embedded_checkpoint, faces):
    import fastface

    images = list(faces["images"][:4])
    questions = ["what colour is her hair?", "is this a man or a woman?", "how old is he?", "does she smile?"]
    ref = fastface.load(embedded_checkpoint, backend="reference")
    fast = fastface.load(embedded_checkpoint, backend="auto")
    a_ref = ref.answer(images, questions, max_new_tokens=6)
    assert fast.answer(images, questions, max_new_tokens=6) == a_ref
    alone = [ref.answer([img], [q], max_new_tokens=6)[0] for img, q in zip(images, questions)]
    assert alone == a_ref, "a request alone == in a batch"
    # the embeddings reach the model: the same prompts without them give other logits
    from fastface.prompts import mmu_prompt_ids

    ids = mmu_prompt_ids(ref.encode_images(images), [ref.encode_text(q) for q in questions], ref.config)
    e_sem, e_id = ref.understanding_embeddings(images)
    task = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        with_emb = ref.model(ids, task, cond_mask=ids != ref.config.pad_id, e_sem=e_sem, e_id=e_id).logits
        without = ref.model(ids, task, cond_mask=ids != ref.config.pad_id).logits
    assert float((with_emb - without).abs().max()) > 1e-3
    # and through token ids (decoded to pixels first) the same embeddings come out
    e2 = ref.understanding_embeddings(ref.encode_images(images))[0]
    assert e2.shape == e_sem.shape


def test_embeddings_given_engine_equals_reference_tokens(embedded_checkpoint, faces):
    """Engine and reference answer loops on the same prompts and embeddings: the same tokens, greedy and sampled."""
    import fastface
    from fastface.prompts import mmu_prompt_ids
    from fastface.sampling import generate_answer_ids

    pipe = fastface.load(embedded_checkpoint, backend="auto")
    images = list(faces["images"][4:9])
    qs = ["what colour is his shirt?", "w", "what is her age?", "is she wearing glasses?", "hair?"]
    ids = mmu_prompt_ids(pipe.encode_images(images), [pipe.encode_text(q) for q in qs], pipe.config)
    e_sem, e_id = pipe.understanding_embeddings(images)
    for top_p in (None, 0.9):
        kw = dict(max_new_tokens=5, top_p=top_p, seeds=list(range(5)), e_sem=e_sem, e_id=e_id)
        pipe.model.set_backend("reference")
        want = generate_answer_ids(pipe.model, ids, **kw)
        pipe.model.set_backend("auto")
        assert pipe.engine.generate_answer_ids(ids, **kw) == want


def _world(tower, faces_n=12):
    from fastface.data.training import FaceWorldData
    from fastface.vq import VQModel

    cfg = FaceConfig.from_name("tiny", text_vocab_size=256)
    torch.manual_seed(2)
    vq = VQModel.from_name("tiny", channels=(4, 4, 4, 4, 8), enc_blocks=(0,) * 5, dec_blocks=(0,) * 5,
                           codebook_size=cfg.codebook_size, code_dim=8).eval()
    embedder = FaceTextModel(tiny_facetext(tower, 256), tower, default_text_tokenizer(256))
    return cfg, FaceWorldData.build(cfg, faces=faces_n, seed=3, image_tokenizer=vq, embedder=embedder), vq


def test_batches_carry_each_understanding_rows_embeddings(tower):
    from fastface.train import make_batch

    cfg, data, _ = _world(tower)
    batch = make_batch(data, cfg, seed=0, step=0, batch_size=10, mmu_fraction=0.5)
    assert batch.e_sem.shape == (10, cfg.sem_dim) and batch.e_id.shape == (10, cfg.id_dim)
    Bt = len(batch.t2i_rows)
    assert 0 < Bt < 10
    assert float(batch.e_sem[:Bt].abs().sum()) == 0.0, "t2i rows read no embedding"
    # each understanding row holds the embeddings of its own face (found by its image tokens)
    for j, row in enumerate(batch.mmu_rows.tolist()):
        tokens = batch.input_ids[row][batch.input_ids[row] >= cfg.image_token_offset][: cfg.image_tokens]
        face = [i for i in range(len(data)) if torch.equal(data.image_tokens[i] + cfg.image_token_offset, tokens)]
        assert any(torch.equal(batch.e_sem[row], data.e_sem[i]) for i in face), j


def test_rsc_loss_falls_and_is_training_only(tower, tmp_path):
    from fastface.model import FaceTransformer
    from fastface.train import SemanticConsistency, TrainSettings, batch_loss, make_batch, train

    cfg, data, vq = _world(tower)
    torch.manual_seed(0)
    model = FaceTransformer(cfg)
    model.reset_parameters(1)
    rsc = SemanticConsistency(vq, data.embedder, cfg)
    batch = make_batch(data, cfg, seed=0, step=1, batch_size=8, mmu_fraction=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    values = []
    for _ in range(25):  # the RSC term alone on one batch: it must be learnable through the model's logits
        out = model(batch.input_ids, batch.task, cond_mask=batch.cond_mask)
        N, off, K = cfg.image_tokens, cfg.image_token_offset, cfg.codebook_size
        loss = rsc(out.logits[batch.t2i_rows, batch.image_start: batch.image_start + N, off: off + K], batch)
        opt.zero_grad()
        loss.backward()
        assert float(model.lm_head.weight.grad.abs().max()) > 0
        opt.step()
        values.append(float(loss.detach()))
    # (random tiny image tokenizer and tower: decoded images span little of the embedding space, so the fall is
    # small here; test_shipped_rsc_moves_images_toward_their_prompt measures it on the real parts)
    assert values[-1] < values[0] - 2e-3 and min(values[-5:]) < min(values[:5]), values
    assert all(p.grad is None for p in rsc.vq.parameters()), "the image tokenizer stays frozen"
    # weight 0 is exactly no RSC; a run with RSC saves the same tensors (inference needs nothing new)
    torch.manual_seed(0)
    m1, m2 = FaceTransformer(cfg), FaceTransformer(cfg)
    m1.reset_parameters(1)
    m2.reset_parameters(1)
    l1, _ = batch_loss(m1, batch, cfg)
    l2, _ = batch_loss(m2, batch, cfg, rsc=rsc, rsc_weight=0.0)
    assert torch.equal(l1, l2)
    settings = TrainSettings(steps=2, batch_size=6, rsc_weight=1.0, save_every=2, log_every=1, warmup=1)
    history = train(m2, data, data.tokenizer, settings, tmp_path / "run", image_tokenizer=vq, progress=False)
    assert all("rsc" in h for h in history if h.get("t2i") is not None)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "step-0000002" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(m1.state_dict())
    assert (tmp_path / "run" / "step-0000002" / "facetext.safetensors").is_file()


def test_rsc_needs_its_parts(tower):
    from fastface.train import SemanticConsistency

    cfg, data, vq = _world(tower, 2)
    with pytest.raises(ValueError, match="face-text model"):
        SemanticConsistency(vq, None, cfg)
    with pytest.raises(ValueError, match="image tokenizer"):
        SemanticConsistency(None, data.embedder, cfg)


# ------------------------------------------------------------------------------------------- shipped

@shipped
def test_shipped_model_retrieves_held_out_faces():
    """Fresh held-out faces (another slice of the held-out set than the card's 1,000): text->image and back."""
    from fastface.data.attributes import N_IDENTITIES
    from fastface.data.dataset import make_dataset
    from fastface.facetext.train import EVAL_SEED
    from fastface.perception.train import HELD_OUT_IDENTITIES

    data = make_dataset(300, EVAL_SEED, n_identities=N_IDENTITIES - HELD_OUT_IDENTITIES,
                        identity_offset=HELD_OUT_IDENTITIES, captions=True, start=5000)
    ft = FaceTextModel.load()
    r = retrieval(ft.embed_images(data["images"]), ft.embed_texts(data["captions"]))
    assert r["text_to_image"]["R@1"] >= 0.85 and r["image_to_text"]["R@1"] >= 0.85, r
    assert r["text_to_image"]["R@5"] >= 0.97 and r["image_to_text"]["R@5"] >= 0.97, r


@shipped
def test_shipped_model_reads_single_attributes():
    """A one-attribute text ranks the faces that have it above those that do not (AUC well above chance)."""
    data = held_out(200)
    ft = FaceTextModel.load()
    e = ft.embed_images(data["images"])
    for text, name, value in (("a woman", "gender", "woman"), ("a man with a beard", "facial_hair", "beard"),
                              ("an old person", "age", "old"), ("a person wearing sunglasses", "glasses",
                                                                 "sunglasses")):
        score = (e @ ft.embed_texts([text]).T)[:, 0]
        has = torch.tensor([getattr(a, name) == value for a in data["attrs"]])
        pos, neg = score[has], score[~has]
        auc = float((pos[:, None] > neg[None, :]).float().mean())
        assert auc > 0.9, (text, auc)


@shipped
def test_shipped_rsc_moves_images_toward_their_prompt():
    """With the face-s image tokenizer and face-text model: free image-token logits trained on the RSC loss alone
    pull the decoded faces toward their prompts (cosine up by > 0.1 in 30 steps)."""
    from fastface.data.training import load_image_tokenizer
    from fastface.train import Batch, SemanticConsistency

    cfg = FaceConfig.from_name("face-s")
    data = held_out(4)
    ft = FaceTextModel.load()
    vq = load_image_tokenizer()
    rsc = SemanticConsistency(vq, ft, cfg)
    other = held_out(8)["captions"][4:]  # prompts of other faces: the images start far from them
    text = [ft.tokenizer.encode(c, add_special_tokens=False).ids for c in other]
    N = cfg.image_tokens
    targets = vq.encode(data["images"])
    masked = torch.zeros(4, N, dtype=torch.bool)
    masked[:, ::2] = True  # half the tokens are free
    batch = Batch(input_ids=torch.zeros(4, 1, dtype=torch.long), task=torch.ones(4, dtype=torch.long),
                  cond_mask=torch.zeros(4, 1, dtype=torch.bool), t2i_rows=torch.arange(4), image_start=0,
                  masked=masked, targets=targets, mask_ratio=torch.full((4,), 0.5), mmu_rows=torch.arange(0),
                  next_targets=torch.zeros(0, 1, dtype=torch.long), answer_mask=torch.zeros(0, 1, dtype=torch.bool),
                  t2i_text=text)
    logits = (F.one_hot(targets, cfg.codebook_size).float() * 5).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.1)
    values = []
    for _ in range(30):
        loss = rsc(logits, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(float(loss.detach()))
    assert values[-1] < values[0] - 0.1, values


# ------------------------------------------------------------------------------------- search, eval score

def _search(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "fastface.cli", "search", *args], capture_output=True, text=True,
                          timeout=300)


def test_search_ranks_a_folder_by_the_models_similarity(saved, faces, tmp_path):
    from PIL import Image

    folder = tmp_path / "faces"
    (folder / "sub").mkdir(parents=True)
    paths = []
    for i in range(5):
        p = folder / ("sub" if i % 2 else "") / f"f{i}.png"
        Image.fromarray(faces["images"][i]).save(p)
        paths.append(p)
    Image.fromarray(faces["images"][5]).resize((128, 128)).save(folder / "big.png")  # resized to 64x64
    (folder / "notes.png").write_text("not an image")
    r = _search(str(folder), "a smiling woman", "--top", "3", "--model", str(saved), "--json")
    assert r.returncode == 0, r.stderr
    assert "skipped" in r.stderr and "notes.png" in r.stderr
    out = json.loads(r.stdout)
    assert out["query"] == "a smiling woman" and len(out["results"]) == 3
    ft = FaceTextModel.load(saved)
    from fastface.images import open_image

    names = sorted([*map(str, paths), str(folder / "big.png")])
    arrays = np.stack([np.asarray(open_image(n).resize((64, 64))) for n in names])
    want = ft.similarity(arrays, ["a smiling woman"])[:, 0]
    order = torch.argsort(want, descending=True)[:3].tolist()
    assert [row["image"] for row in out["results"]] == [names[i] for i in order]
    assert [row["score"] for row in out["results"]] == pytest.approx([float(want[i]) for i in order], abs=1e-3)
    r = _search(str(folder), "a man", "an old woman", "--model", str(saved))
    assert r.returncode == 0 and r.stdout.count("# ") == 2


def test_search_errors_without_traceback(saved, tmp_path):
    (tmp_path / "empty").mkdir()
    for args, match in (((str(tmp_path / "none"), "x"), "not a folder"), ((str(tmp_path / "empty"), "x"), "no images"),
                        ((str(tmp_path / "empty"), "x", "--top", "0"), "--top"),
                        ((str(tmp_path / "empty"), " "), "query is empty")):
        r = _search(*args, "--model", str(saved))
        assert r.returncode == 2 and match in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_facetext_scores_contract(embedded_checkpoint, faces):
    import fastface
    from fastface.evaluate import facetext_scores

    pipe = fastface.load(embedded_checkpoint, backend="reference")
    images, prompts = faces["images"][:4], faces["captions"][:4]
    s = facetext_scores(pipe, images, images, prompts)
    assert s["count"] == 4 and s["score"] == pytest.approx(s["real"], abs=1e-5)
    sim = pipe.similarity(images, prompts)
    assert s["r_at_1"] == pytest.approx(float((sim.argmax(1) == torch.arange(4)).float().mean()))
    assert s["shuffled"] == pytest.approx(float(sim.roll(1, dims=1).diagonal().mean()), abs=1e-5)


@shipped
def test_shipped_facetext_score_separates_matched_from_shuffled():
    import fastface
    from fastface.evaluate import attribute_prompts, facetext_scores

    data = held_out(60)
    prompts, _ = attribute_prompts(data["attrs"], per_prompt=6)
    s = facetext_scores(fastface.load(), data["images"], data["images"], prompts)
    # a 6-attribute prompt can fit several of 60 faces: R@1 is held to what reading the attributes exactly gives
    from fastface.data.text import parse_caption

    truth = [a.to_dict() for a in data["attrs"]]
    fits = [sum(all(t[k] in v for k, v in parse_caption(p).items()) for t in truth) for p in prompts]
    oracle = float(np.mean([1 / n for n in fits]))
    # measured when shipped: 0.767 against the oracle's 0.975 (trained on ~12-attribute captions, the model ranks
    # 6-attribute prompts less sharply; FACETEXT.md)
    assert s["real"] > s["shuffled"] + 0.3 and s["r_at_1"] >= 0.7 and oracle > 0.9, (s, oracle)


def test_embedding_projections_learn_at_their_own_rate(tiny_config):
    from fastface.model import FaceTransformer
    from fastface.train import SyntheticData, TrainSettings, make_optimizer, train

    model = FaceTransformer(tiny_config)
    model.reset_parameters(0)
    opt = make_optimizer(model, 1e-3, 0.05, embedding_lr_scale=20)
    proj = {id(layer.seq_moe.sem_proj.weight) for layer in model.layers} | \
        {id(layer.seq_moe.id_proj.weight) for layer in model.layers}
    groups = [g for g in opt.param_groups if g["lr_scale"] == 20]
    assert len(groups) == 1 and {id(p) for p in groups[0]["params"]} == proj
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    # with embeddings the projections move; without them they keep their initial values exactly
    for embeddings in (True, False):
        m = FaceTransformer(tiny_config)
        m.reset_parameters(0)
        before = m.layers[0].seq_moe.sem_proj.weight.clone()
        data = SyntheticData(tiny_config, size=16, embeddings=embeddings)
        train(m, data, None, TrainSettings(steps=3, batch_size=8, mmu_fraction=1.0, warmup=1,
                                           embedding_lr_scale=20), progress=False)
        moved = not torch.equal(before, m.layers[0].seq_moe.sem_proj.weight)
        assert moved == embeddings
