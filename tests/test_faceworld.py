"""Face world: determinism, label consistency, identity, makeup, captions/VQA against attributes, tokenizer."""

import dataclasses

import numpy as np
import pytest

from fastface.config import SPECIAL_TOKENS, UNK_ID
from fastface.data.attributes import ATTRIBUTES, IDENTITY_ATTRIBUTES, FaceAttributes, sample_attributes, sample_identity
from fastface.data.dataset import make_dataset
from fastface.data.renderer import (
    ACCESSORIES,
    EYES,
    GLASSES,
    HAIR,
    LANDMARKS,
    LIPS,
    NOSE,
    PARSING_CLASSES,
    SKIN,
    render,
)
from fastface.data.text import answer_text, caption, parse_caption, split_words, vocabulary, vqa_pairs
from fastface.tokenizer import build_text_tokenizer, decode_text, encode_text, load_text_tokenizer

N = 120  # faces per dataset-level test (about 0.4 s)


@pytest.fixture(scope="module")
def data():
    return make_dataset(N, seed=11)


def _attrs(seed=0, **changes):
    return dataclasses.replace(sample_attributes(np.random.default_rng(seed)), **changes)


# ------------------------------------------------------------------------------------- generator

def test_dataset_shapes_and_dtypes(data):
    assert data["images"].shape == (N, 64, 64, 3) and data["images"].dtype == np.uint8
    assert data["parsing"].shape == (N, 64, 64) and data["parsing"].dtype == np.uint8
    assert data["landmarks"].shape == (N, len(LANDMARKS), 2) and data["landmarks"].dtype == np.float32
    assert data["labels"].shape == (N, len(ATTRIBUTES)) and data["identity"].shape == (N,)
    assert int(data["parsing"].max()) < len(PARSING_CLASSES)
    assert len(ATTRIBUTES) >= 16 and all(len(v) >= 2 for v in ATTRIBUTES.values())


def test_deterministic_per_seed(data):
    again = make_dataset(N, seed=11)
    for key in ("images", "parsing", "landmarks", "labels", "identity"):
        np.testing.assert_array_equal(data[key], again[key], err_msg=key)
    assert data["captions"] == again["captions"]
    other = make_dataset(8, seed=12)
    assert not np.array_equal(other["images"], data["images"][:8])
    # a slice of a dataset equals the same samples rendered alone
    part = make_dataset(5, seed=11, start=40)
    np.testing.assert_array_equal(part["images"], data["images"][40:45])


def test_render_sizes_and_canonical_pose():
    a = _attrs(3)
    big = render(a, size=128, seed=4)
    assert big.image.shape == (128, 128, 3) and big.parsing.shape == (128, 128)
    assert np.array_equal(render(a, jitter=False).image, render(a, seed=None).image)
    assert not np.array_equal(render(a, seed=1).image, render(a, seed=2).image)
    with pytest.raises(ValueError, match="size"):
        render(a, size=32)
    with pytest.raises(TypeError):
        render(a.to_dict())


@pytest.mark.parametrize("cls, present", [
    (GLASSES, lambda a: a.glasses != "none"),
    (ACCESSORIES, lambda a: a.hat != "none" or a.earrings != "none"),
    (HAIR, lambda a: a.hair_style != "bald" or a.facial_hair != "none"),
])
def test_parsing_classes_only_when_present(data, cls, present):
    for i, a in enumerate(data["attrs"]):
        count = int((data["parsing"][i] == cls).sum())
        assert (count > 0) == present(a), f"sample {i}: {PARSING_CLASSES[cls]} has {count} pixels for {a}"


def test_hat_and_earring_pixels():
    for hat in ("none", "cap", "beanie", "top hat"):
        for earrings in ("none", "hoops", "studs"):
            a = _attrs(5, hair_style="short", hat=hat, hat_colour="none" if hat == "none" else "red",
                       earrings=earrings)
            face = render(a, seed=1)
            acc = face.parsing == ACCESSORIES
            upper, lower = acc[:20].sum(), acc[34:].sum()  # hats sit above the brows, earrings below the ears
            assert (upper > 0) == (hat != "none"), (hat, earrings)
            assert (lower > 0) == (earrings != "none"), (hat, earrings)


def test_landmarks_inside_the_face(data):
    for i in range(N):
        lab, lm = data["parsing"][i], data["landmarks"][i]
        assert ((lm >= 0) & (lm <= 63)).all()
        px = np.rint(lm).astype(int)
        eye_ok = {EYES, GLASSES}
        for k in (0, 1):
            x, y = px[k]
            assert lab[y, x] in eye_ok, f"sample {i}: eye landmark on {PARSING_CLASSES[lab[y, x]]}"
        x, y = px[2]
        assert lab[y, x] in (NOSE, SKIN), f"sample {i}: nose tip on {PARSING_CLASSES[lab[y, x]]}"
        for k in (3, 4):
            x, y = px[k]
            window = lab[y - 2 : y + 3, x - 2 : x + 3]
            assert (window == LIPS).any(), f"sample {i}: mouth corner {k} is not at the lips"
        assert lm[0, 0] < lm[1, 0], "left eye (image left) comes first"
        assert lm[3, 0] < lm[4, 0] and lm[2, 1] > lm[0, 1] and lm[3, 1] > lm[2, 1]


def test_identity_fixes_identity_attributes():
    for identity in (0, 7, 12345):
        faces = [sample_attributes(np.random.default_rng(s), identity=identity) for s in range(12)]
        ref = sample_identity(identity)
        for a in faces:
            assert a.identity == identity
            for name in IDENTITY_ATTRIBUTES:
                assert getattr(a, name) == ref[name], name
        varying = {name for name in ATTRIBUTES if len({getattr(a, name) for a in faces}) > 1}
        assert {"expression", "background", "glasses"} <= varying
    with pytest.raises(ValueError, match="identity"):
        sample_identity(-1)


def test_identity_range():
    rng = np.random.default_rng(0)
    ids = [sample_attributes(rng, n_identities=10, identity_offset=1000).identity for _ in range(50)]
    assert min(ids) >= 1000 and max(ids) < 1010


def test_makeup_changes_only_lips_eyes_and_cheeks():
    checked = 0
    for seed in range(40):
        a = _attrs(seed, gender="woman", facial_hair="none", lipstick="red", eye_shadow="blue", blush="yes")
        on, off = render(a, seed=seed), render(a, seed=seed, makeup=False)
        np.testing.assert_array_equal(on.parsing, off.parsing)
        np.testing.assert_array_equal(on.landmarks, off.landmarks)
        assert np.array_equal(off.image, render(a.without_makeup(), seed=seed).image)
        changed = (on.image != off.image).any(-1)
        assert changed.any()
        yy, xx = np.mgrid[0:64, 0:64]
        allowed = np.zeros((64, 64), bool)
        lips = on.parsing == LIPS
        for dy in (-2, -1, 0, 1, 2):  # label maps are point-sampled, colours box-filtered: 2 px of slack
            for dx in (-2, -1, 0, 1, 2):
                allowed |= np.roll(np.roll(lips, dy, 0), dx, 1)
        nose_y = on.landmarks[2, 1]
        for ex, ey in on.landmarks[:2]:
            allowed |= (np.abs(xx - ex) <= 6.5) & (yy >= ey - 6.5) & (yy <= ey + 3.5)  # eye shadow
            allowed |= (np.abs(xx - ex) <= 6.5) & (yy >= nose_y - 4.5) & (yy <= nose_y + 5.5)  # blush
        outside = changed & ~allowed
        assert not outside.any(), f"seed {seed}: makeup changed pixels at {np.argwhere(outside)[:5].tolist()}"
        checked += 1
    assert checked == 40


def test_attributes_validate():
    with pytest.raises(ValueError, match="hair_colour"):
        _attrs(0, hair_colour="green")
    with pytest.raises(ValueError, match="hat"):
        _attrs(0, hat="cap", hat_colour="none")
    a = _attrs(0)
    assert FaceAttributes(**a.to_dict()) == a


# ------------------------------------------------------------------------------------ captions, VQA

def _check_parsed(a, found, where):
    for name, values in found.items():
        assert values == {getattr(a, name)}, f"{where}: {name} parsed as {values}, attrs say {getattr(a, name)!r}"


def test_captions_agree_with_attributes(data):
    counts = []
    for i, (a, text) in enumerate(zip(data["attrs"], data["captions"])):
        assert text == text.lower() and len(split_words(text)) <= 60, text
        found = parse_caption(text)
        _check_parsed(a, found, f"caption {i} {text!r}")
        assert "gender" in found
        counts.append(len(found))
    assert np.mean(counts) >= 10, f"captions mention {np.mean(counts):.1f} attributes on average"


def test_captions_vary_and_are_deterministic():
    a = _attrs(1)
    texts = {caption(a, np.random.default_rng(s)) for s in range(20)}
    assert len(texts) >= 15
    assert caption(a, np.random.default_rng(3)) == caption(a, np.random.default_rng(3))
    first_words = {caption(_attrs(s), np.random.default_rng(s)).split()[1] for s in range(40)}
    assert len(first_words) >= 4, "openers and word orders vary"


def test_vqa_answers_agree_with_attributes(data):
    kinds = set()
    for i, a in enumerate(data["attrs"]):
        for qa in vqa_pairs(a, np.random.default_rng(i), 8, details=True):
            q, ans, name = qa["question"], qa["answer"], qa["attribute"]
            kinds.add(qa["kind"])
            assert q.endswith("?") and q == q.lower()
            if qa["kind"] == "open":
                assert ans == answer_text(name, getattr(a, name)), (q, ans, a)
            elif qa["value"] == "present":
                assert ans == ("no" if getattr(a, name) in ("none", "no") else "yes"), (q, ans, a)
            else:
                assert ans == ("yes" if getattr(a, name) == qa["value"] else "no"), (q, ans, a)
            if name == "eye_colour":
                assert a.glasses != "sunglasses", "eye colour is not asked behind sunglasses"
            if name == "hair_colour":
                assert a.hair_style != "bald"
    assert kinds == {"open", "yes/no"}
    pairs = vqa_pairs(data["attrs"][0], np.random.default_rng(0), 3)
    assert len(pairs) == 3 and all(isinstance(q, str) and isinstance(ans, str) for q, ans in pairs)


def test_vqa_yes_no_balanced(data):
    answers = [qa["answer"] for i, a in enumerate(data["attrs"])
               for qa in vqa_pairs(a, np.random.default_rng(i), 10, yes_no=1.0, details=True)]
    share = answers.count("yes") / len(answers)
    assert 0.3 < share < 0.7, share


def test_vocabulary_covers_all_text(data):
    vocab = set(vocabulary())
    assert len(vocab) <= 376, "face-s keeps 384 text ids, 8 of them special"
    for i, a in enumerate(data["attrs"]):
        rng = np.random.default_rng(i)
        words = split_words(caption(a, rng))
        for q, ans in vqa_pairs(a, rng, 10):
            words += split_words(q) + split_words(ans)
        missing = set(words) - vocab
        assert not missing, f"words outside vocabulary(): {sorted(missing)}"


# -------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_specials_round_trip_and_unknown(tmp_path):
    tok = build_text_tokenizer(vocabulary(), vocab_size=384)
    assert tok.get_vocab_size(with_added_tokens=True) == 384
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    text = "a smiling middle-aged woman with long red hair, round glasses and blue eyes. is she wearing a hat?"
    ids = encode_text(tok, text)
    assert UNK_ID not in ids and all(i >= len(SPECIAL_TOKENS) for i in ids)
    assert decode_text(tok, ids) == text
    tok.save(str(tmp_path / "tokenizer.json"))
    again = load_text_tokenizer(tmp_path)
    assert encode_text(again, text) == ids and decode_text(again, ids) == text
    odd = encode_text(tok, "A Zebra-striped WOMAN with 3 hats!")
    assert odd.count(UNK_ID) == 4 and tok.id_to_token(odd[2]) == "woman"
    assert encode_text(tok, "") == []


def test_tokenizer_options():
    tok = build_text_tokenizer(["b", "a", "b"])
    assert tok.get_vocab_size(with_added_tokens=True) == len(SPECIAL_TOKENS) + 2
    assert tok.token_to_id("b") == len(SPECIAL_TOKENS)
    with pytest.raises(ValueError, match="vocab_size"):
        build_text_tokenizer(vocabulary(), vocab_size=20)
    with pytest.raises(ValueError, match="word"):
        build_text_tokenizer(["two words"])
    with pytest.raises(TypeError):
        encode_text(tok, None)


def test_parsing_is_the_class_covering_most_of_each_pixel():
    from fastface.data.renderer import _CANVAS, _draw, _draw_pose, area_labels

    rng = np.random.default_rng(5)
    labels = rng.integers(0, 10, (12, 8)).astype(np.uint8)
    got = area_labels(labels, 4)
    assert got.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            counts = np.bincount(labels[4 * i : 4 * i + 4, 4 * j : 4 * j + 4].ravel(), minlength=10)
            assert got[i, j] == counts.argmax()  # ties: the lower class
    attrs = sample_attributes(np.random.default_rng(1))
    face = render(attrs, jitter=False)
    canvas, _, _ = _draw(attrs, _draw_pose(None), True)
    assert np.array_equal(face.parsing, area_labels(np.asarray(canvas.lab), _CANVAS // 64))
