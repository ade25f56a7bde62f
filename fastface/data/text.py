"""Captions and VQA pairs from face-world attributes, over a small closed vocabulary.

    text = caption(attrs, rng)          # "a smiling old man with a grey beard and round glasses. he has ..."
    pairs = vqa_pairs(attrs, rng, 4)    # [("what colour are his eyes?", "blue"), ("is he wearing a hat?", "no"), …]
    found = parse_caption(text)         # {"gender": "man", "age": "old", "facial_hair": "beard", …}
    words = vocabulary()                # every word and punctuation mark captions, questions and answers use

Text is lower-case words (some hyphenated: "middle-aged") plus ``, . ?``; a word-level tokenizer splits it
as ``split_words`` does. Captions fit ``max_tokens`` tokens (60 by default: a face-s prompt holds 61 between
``<t2i> <bos>`` and ``<eos>``).
"""

from __future__ import annotations

import re

import numpy as np

from fastface.data.attributes import ATTRIBUTES, FaceAttributes

_WORD = re.compile(r"\w+(?:-\w+)*|[^\w\s]|-")


def split_words(text: str) -> list[str]:
    """Words and single punctuation marks, as the text tokenizer's pre-tokenizer splits them."""
    return _WORD.findall(text.lower())


# ------------------------------------------------------------------------------------------ phrases

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _a(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


HAIR_STYLE_WORD = {"bald": "bald", "buzz": "buzz cut", "short": "short", "long": "long", "curly": "curly",
                   "bun": "bun", "bob": "bob"}
# answers to open questions, where the attribute value is not itself the best short answer
ANSWER_TEXT = {
    ("hair_style", "buzz"): "buzz cut",
    ("expression", "open"): "open mouth",
}


def answer_text(name: str, value: str) -> str:
    """The short answer naming ``value`` of attribute ``name``."""
    return ANSWER_TEXT.get((name, value), value)


def _hair_phrase(style: str, colour: str | None, rng) -> str:
    if style == "bald":
        return "a bald head"
    c = f"{colour} " if colour else ""
    if style == "buzz":
        return f"{_article(c or 'buzz')} {c}buzz cut"
    if style in ("short", "long", "curly"):
        return f"{style} {c}hair"
    if style == "bun":
        return f"{c}hair in a bun"
    return f"{_article(c or 'bob')} {c}bob"


def _phrases(a: FaceAttributes, name: str, rng) -> str | None:
    """A noun phrase naming attribute ``name`` of ``a`` (for 'with …', 'has …', 'is wearing …')."""
    v = getattr(a, name)
    pos = "her" if a.gender == "woman" else "his"
    if name == "face_shape":
        return _a(f"{v} face")
    if name == "skin_tone":
        return f"{v} skin"
    if name == "eye_colour":
        return f"{v} eyes"
    if name == "eyebrows":
        return f"{v} eyebrows"
    if name == "nose":
        return _a(f"{v} nose")
    if name == "expression":
        return {"smiling": "a smile", "neutral": "a neutral expression", "open": "an open mouth",
                "frowning": "a frown"}[v]
    if name == "glasses":
        return {"none": "no glasses", "round": "round glasses", "square": "square glasses",
                "sunglasses": "sunglasses" if rng.random() < 0.5 else "dark sunglasses"}[v]
    if name == "facial_hair":
        if v == "none":
            return "no facial hair"
        if v == "stubble":
            return "stubble"
        if rng.random() < 0.4:
            return _a(f"{a.hair_colour} {v}")
        return _a(v)
    if name == "earrings":
        return {"none": "no earrings", "hoops": "hoop earrings" if rng.random() < 0.5 else "gold hoop earrings",
                "studs": "stud earrings" if rng.random() < 0.5 else "gold stud earrings"}[v]
    if name == "hat":
        return "no hat" if v == "none" else _a(f"{a.hat_colour} {v}")
    if name == "lipstick":
        return "no lipstick" if v == "none" else f"{v} lipstick"
    if name == "eye_shadow":
        return "no eye shadow" if v == "none" else f"{v} eye shadow"
    if name == "blush":
        if v == "no":
            return "no blush"
        return "blush" if rng.random() < 0.5 else f"blush on {pos} cheeks"
    if name == "shirt_colour":
        return _a(f"{v} shirt")
    raise KeyError(name)


_WEAR = ("glasses", "earrings", "hat", "lipstick", "eye_shadow", "blush", "shirt_colour")
_HAS = ("face_shape", "skin_tone", "eye_colour", "eyebrows", "nose", "hair", "expression", "facial_hair")
_OPENERS = ("a", "a photo of", "a portrait of", "a picture of", "a close-up of", "a drawing of")
_HAS_VERBS = ("has", "has got")
_WEAR_VERBS = ("is wearing", "wears", "has on")
_BG_AFTER = ("in front of", "against", "on")
_BG_SENTENCES = ("the background is {c}.", "{C} background.", "the backdrop is {c}.")
# probability that an attribute is mentioned (values that are the default are mentioned less often)
_MENTION = {"age": 0.8, "expression": 0.8, "face_shape": 0.6, "skin_tone": 0.7, "eye_colour": 0.75,
            "eyebrows": 0.5, "nose": 0.5, "hair": 0.95, "glasses": 0.95, "facial_hair": 0.8, "earrings": 0.9,
            "hat": 0.95, "lipstick": 0.9, "eye_shadow": 0.9, "blush": 0.85, "background": 0.85,
            "shirt_colour": 0.6}
_MENTION_NONE = 0.2  # for "none" values of accessories and makeup


def _mentioned(a: FaceAttributes, rng) -> list[str]:
    names = []
    for name, p in _MENTION.items():
        value = getattr(a, name) if name != "hair" else a.hair_style
        if value in ("none", "no"):
            if a.gender == "man" and name in ("lipstick", "eye_shadow", "blush"):
                p = 0.05
            elif a.gender == "woman" and name == "facial_hair":
                p = 0.0
            else:
                p = _MENTION_NONE
        if rng.random() < p:
            names.append(name)
    return names


def _build_caption(a: FaceAttributes, names: list[str], rng) -> str:
    she = "she" if a.gender == "woman" else "he"
    adjs = []
    if "age" in names:
        adjs.append(a.age)
    if "expression" in names and a.expression in ("smiling", "frowning") and rng.random() < 0.7:
        adjs.insert(0, a.expression)
        names = [n for n in names if n != "expression"]
    noun = a.gender
    head = " ".join([*adjs, noun])
    opener = _OPENERS[int(rng.integers(len(_OPENERS)))]
    subject = f"{opener} {_article(head)} {head}" if opener != "a" else _a(head)

    has, wear = [], []
    for name in names:
        if name in ("age", "background"):
            continue
        if name == "hair":
            colour = a.hair_colour if a.hair_style != "bald" and rng.random() < 0.9 else None
            has.append(_hair_phrase(a.hair_style, colour, rng))
        elif name in _HAS:
            has.append(_phrases(a, name, rng))
        else:
            wear.append(_phrases(a, name, rng))
    rng.shuffle(has)
    rng.shuffle(wear)
    # split the phrases between "<subject> with …" and the following sentences
    n_with = int(rng.integers(0, len(has) + 1)) if has else 0
    with_items = has[:n_with]
    rest_has = has[n_with:]
    if wear and rng.random() < 0.3:
        k = int(rng.integers(1, len(wear) + 1))
        with_items, wear = with_items + wear[:k], wear[k:]
    first = subject
    if with_items:
        first += " with " + _join(with_items)
    sentences = []
    bg = None
    if "background" in names:
        if rng.random() < 0.5:
            first += f", {_BG_AFTER[int(rng.integers(3))]} {_a(a.background + ' background')}"
        else:
            form = _BG_SENTENCES[int(rng.integers(len(_BG_SENTENCES)))]
            bg = form.format(c=a.background, C=_a(a.background).capitalize()).lower()
    if rest_has:
        sentences.append(f"{she} {_HAS_VERBS[int(rng.integers(2))]} {_join(rest_has)}.")
    if wear:
        sentences.append(f"{she} {_WEAR_VERBS[int(rng.integers(3))]} {_join(wear)}.")
    if bg:
        sentences.append(bg)
    rng.shuffle(sentences)
    return " ".join([first + ".", *sentences])


def caption(attrs: FaceAttributes, rng: np.random.Generator, *, max_tokens: int = 60) -> str:
    """A fine-grained description of ``attrs`` (varied templates and orders; deterministic given ``rng``).

    About 12 attributes are mentioned on average; attributes are dropped at random until the caption fits
    ``max_tokens`` tokens (words and punctuation marks).
    """
    if not isinstance(attrs, FaceAttributes):
        raise TypeError(f"attrs must be FaceAttributes, got {type(attrs).__name__}")
    names = _mentioned(attrs, rng)
    while True:
        text = _build_caption(attrs, names, rng)
        if len(split_words(text)) <= max_tokens or not names:
            return text
        names.pop(int(rng.integers(len(names))))


def prompt(attrs: FaceAttributes, names: list[str], rng: np.random.Generator | None = None) -> str:
    """A caption naming exactly the attributes ``names`` (use "hair" for hair style and colour together)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    return _build_caption(attrs, list(names), rng)


# --------------------------------------------------------------------------------------- parse back

_COLOURS = sorted({c for n in ("hair_colour", "hat_colour", "background", "shirt_colour", "lipstick", "eye_shadow",
                               "eye_colour") for c in ATTRIBUTES[n] if c != "none"})
_C = "|".join(_COLOURS)
_PATTERNS: dict[str, list[tuple[str, str | None]]] = {
    # attribute -> [(regex, value or None = group 1)]
    "gender": [(r"\b(woman|man)\b", None)],
    "age": [(r"\b(young|middle-aged|old)\b", None)],
    "face_shape": [(r"\b(oval|round|square|long) face\b", None)],
    "skin_tone": [(r"\b(pale|fair|tan|brown|dark) skin\b", None)],
    "eye_colour": [(r"\b(brown|blue|green|grey) eyes\b", None)],
    "eyebrows": [(r"\b(straight|arched|slanted) eyebrows\b", None)],
    "nose": [(r"\b(small|medium|large) nose\b", None)],
    "hair_style": [(r"\bbald\b", "bald"), (r"\bbuzz cut\b", "buzz"), (r"\b(short|long|curly) (?:[a-z]+ )?hair\b", None),
                   (r"\bhair in a bun\b", "bun"), (r"\bbob\b", "bob")],
    "hair_colour": [(rf"\b({_C}) (?:hair|buzz cut|bob|beard|moustache|goatee)\b", None)],
    "expression": [(r"\b(smiling|a smile)\b", "smiling"), (r"\bneutral expression\b", "neutral"),
                   (r"\bopen mouth\b", "open"), (r"\b(frowning|a frown)\b", "frowning")],
    "glasses": [(r"\bno glasses\b", "none"), (r"\bround glasses\b", "round"), (r"\bsquare glasses\b", "square"),
                (r"\bsunglasses\b", "sunglasses")],
    "facial_hair": [(r"\bno facial hair\b", "none"), (r"\bmoustache\b", "moustache"), (r"\bbeard\b", "beard"),
                    (r"\bgoatee\b", "goatee"), (r"\bstubble\b", "stubble")],
    "earrings": [(r"\bno earrings\b", "none"), (r"\bhoop earrings\b", "hoops"), (r"\bstud earrings\b", "studs")],
    "hat": [(r"\bno hat\b", "none"), (rf"\b(?:{_C}) (cap|beanie|top hat)\b", None)],
    "hat_colour": [(rf"\b({_C}) (?:cap|beanie|top hat)\b", None)],
    "lipstick": [(r"\bno lipstick\b", "none"), (rf"\b({_C}) lipstick\b", None)],
    "eye_shadow": [(r"\bno eye shadow\b", "none"), (rf"\b({_C}) eye shadow\b", None)],
    "blush": [(r"\bno blush\b", "no"), (r"(?<!no )\bblush\b", "yes")],
    "background": [(rf"\b({_C}) background\b", None), (rf"\bbackground is ({_C})\b", None),
                   (rf"\bbackdrop is ({_C})\b", None)],
    "shirt_colour": [(rf"\b({_C}) shirt\b", None)],
}


def parse_caption(text: str) -> dict[str, set[str]]:
    """Attribute values a caption names: ``{attribute: {values}}`` (a consistent caption names one each)."""
    text = text.lower()
    found: dict[str, set[str]] = {}
    for name, patterns in _PATTERNS.items():
        for pattern, value in patterns:
            for m in re.finditer(pattern, text):
                found.setdefault(name, set()).add(value if value is not None else m.group(1))
    return found


# -------------------------------------------------------------------------------------------- VQA

_OPEN_QUESTIONS: dict[str, tuple[str, ...]] = {
    "gender": ("is this a man or a woman?", "is this person a man or a woman?"),
    "age": ("how old does {she} look?", "what is {her} age?", "is {she} young, middle-aged or old?"),
    "face_shape": ("what shape is {her} face?", "what is the shape of {her} face?"),
    "skin_tone": ("what is {her} skin tone?", "what colour is {her} skin?"),
    "eye_colour": ("what colour are {her} eyes?", "what is the colour of {her} eyes?"),
    "eyebrows": ("what shape are {her} eyebrows?", "what are {her} eyebrows like?"),
    "nose": ("how big is {her} nose?", "what size is {her} nose?"),
    "hair_style": ("what is {her} hairstyle?", "how is {her} hair styled?"),
    "hair_colour": ("what colour is {her} hair?", "what is the colour of {her} hair?"),
    "expression": ("what is {her} expression?", "what expression does {she} have?"),
    "glasses": ("what kind of glasses is {she} wearing?", "what glasses does {she} have on?"),
    "facial_hair": ("what facial hair does {she} have?", "what kind of facial hair does {she} have?"),
    "earrings": ("what earrings is {she} wearing?", "what kind of earrings does {she} wear?"),
    "hat": ("what hat is {she} wearing?", "what kind of hat does {she} have on?"),
    "hat_colour": ("what colour is {her} hat?",),
    "lipstick": ("what colour is {her} lipstick?", "what lipstick is {she} wearing?"),
    "eye_shadow": ("what colour is {her} eye shadow?", "what eye shadow is {she} wearing?"),
    "blush": ("is {she} wearing blush?", "does {she} have blush on {her} cheeks?"),
    "background": ("what colour is the background?", "what is the background colour?"),
    "shirt_colour": ("what colour is {her} shirt?", "what colour shirt is {she} wearing?"),
}

# the request for a whole description (understanding turns whose answer is a caption); vocabulary words only
CAPTION_QUESTION = "what does this person look like?"

# yes/no questions about one value: attribute -> template with {v} (the value's words)
_YESNO_VALUE: dict[str, tuple[str, ...]] = {
    "gender": ("is this a {v}?",),
    "age": ("is {she} {v}?", "does {she} look {v}?"),
    "face_shape": ("does {she} have {a_v} face?", "is {her} face {v}?"),
    "skin_tone": ("does {she} have {v} skin?",),
    "eye_colour": ("are {her} eyes {v}?", "does {she} have {v} eyes?"),
    "eyebrows": ("are {her} eyebrows {v}?",),
    "nose": ("is {her} nose {v}?", "does {she} have {a_v} nose?"),
    "hair_colour": ("is {her} hair {v}?", "does {she} have {v} hair?"),
    "expression": ("is {she} {ing}?",),
    "glasses": ("is {she} wearing {glasses}?",),
    "facial_hair": ("does {she} have {a_v}?",),
    "earrings": ("is {she} wearing {v_earrings}?",),
    "hat": ("is {she} wearing {a_v}?",),
    "hat_colour": ("is {her} hat {v}?",),
    "lipstick": ("is {she} wearing {v} lipstick?", "is {her} lipstick {v}?"),
    "eye_shadow": ("is {she} wearing {v} eye shadow?",),
    "background": ("is the background {v}?",),
    "shirt_colour": ("is {her} shirt {v}?", "is {she} wearing {a_v} shirt?"),
}
# yes/no questions about presence: attribute -> (templates, absent value)
_YESNO_PRESENCE: dict[str, tuple[tuple[str, ...], str]] = {
    "glasses": (("is {she} wearing glasses?", "does {she} wear glasses?"), "none"),
    "hat": (("is {she} wearing a hat?", "does {she} have a hat on?"), "none"),
    "earrings": (("is {she} wearing earrings?", "does {she} have earrings?"), "none"),
    "facial_hair": (("does {she} have facial hair?",), "none"),
    "lipstick": (("is {she} wearing lipstick?",), "none"),
    "eye_shadow": (("is {she} wearing eye shadow?",), "none"),
}
_EXPRESSION_ING = {"smiling": "smiling", "neutral": "neutral", "open": "surprised", "frowning": "frowning"}
_STYLE_YESNO = {"bald": "is {she} bald?", "long": "is {her} hair long?", "short": "is {her} hair short?",
                "curly": "is {her} hair curly?", "bun": "is {her} hair in a bun?", "bob": "does {she} have a bob?",
                "buzz": "does {she} have a buzz cut?"}


def _answerable(a: FaceAttributes, name: str) -> bool:
    if name == "hair_colour":
        return a.hair_style != "bald"
    if name == "eye_colour":
        return a.glasses != "sunglasses"
    if name == "hat_colour":
        return a.hat != "none"
    return True


def _fill(template: str, a: FaceAttributes, **extra) -> str:
    woman = a.gender == "woman"
    return template.format(she="she" if woman else "he", her="her" if woman else "his", **extra)


def vqa_pairs(attrs: FaceAttributes, rng: np.random.Generator, n: int = 4, *, yes_no: float = 0.35,
              details: bool = False) -> list:
    """``n`` question-answer pairs about ``attrs``: open questions (one-word or short answers) and, with
    probability ``yes_no`` each, yes/no questions (half of them true).

    Returns ``[(question, answer), …]``; with ``details=True``, dicts with ``question``, ``answer``,
    ``attribute``, ``value`` (the value asked about) and ``kind`` ("open" | "yes/no").
    """
    if not isinstance(attrs, FaceAttributes):
        raise TypeError(f"attrs must be FaceAttributes, got {type(attrs).__name__}")
    a = attrs
    out = []
    names = [m for m in _OPEN_QUESTIONS if _answerable(a, m)]
    for _ in range(n):
        if rng.random() >= yes_no:
            name = names[int(rng.integers(len(names)))]
            forms = _OPEN_QUESTIONS[name]
            q = _fill(forms[int(rng.integers(len(forms)))], a)
            value = getattr(a, name)
            ans = answer_text(name, value)
            out.append({"question": q, "answer": ans, "attribute": name, "value": value, "kind": "open"})
            continue
        # yes/no
        candidates = [m for m in (*_YESNO_VALUE, *_YESNO_PRESENCE, "hair_style") if _answerable(a, m)]
        name = candidates[int(rng.integers(len(candidates)))]
        truth = getattr(a, name)
        if name in _YESNO_PRESENCE and (name not in _YESNO_VALUE or rng.random() < 0.5):
            forms, absent = _YESNO_PRESENCE[name]
            q = _fill(forms[int(rng.integers(len(forms)))], a)
            ans = "no" if truth == absent else "yes"
            value = "present"
        else:
            values = [v for v in ATTRIBUTES[name] if v not in ("none", "no")]
            if truth in values and rng.random() < 0.5:
                value = truth
            else:
                value = values[int(rng.integers(len(values)))]
            if name == "hair_style":
                q = _fill(_STYLE_YESNO[value], a)
            else:
                forms = _YESNO_VALUE[name]
                words = value
                q = _fill(forms[int(rng.integers(len(forms)))], a, v=words, a_v=_a(words),
                          ing=_EXPRESSION_ING.get(value, value),
                          glasses={"round": "round glasses", "square": "square glasses"}.get(value, value),
                          v_earrings={"hoops": "hoop earrings", "studs": "stud earrings"}.get(value, value))
            ans = "yes" if value == truth else "no"
        out.append({"question": q, "answer": ans, "attribute": name, "value": value, "kind": "yes/no"})
    if details:
        return out
    return [(d["question"], d["answer"]) for d in out]


# ------------------------------------------------------------------------------------------- vocabulary

def vocabulary() -> list[str]:
    """Every word and punctuation mark that captions, questions and answers can contain (sorted)."""
    texts: list[str] = []
    for name, values in ATTRIBUTES.items():
        texts += list(values) + [answer_text(name, v) for v in values]
    texts += list(HAIR_STYLE_WORD.values()) + list(_OPENERS) + list(_HAS_VERBS) + list(_WEAR_VERBS)
    texts += list(_BG_AFTER) + [s.format(c="", C="a") for s in _BG_SENTENCES]
    texts += ["a an with and she he her his , . ? - yes no hair in head face skin eyes eyebrows nose smile neutral",
              "expression open mouth frown no glasses dark facial stubble hoop stud earrings gold hat lipstick",
              "eye shadow blush on cheeks shirt background looks cut"]
    for forms in _OPEN_QUESTIONS.values():
        texts += [f.format(she="", her="") for f in forms]
    for forms in _YESNO_VALUE.values():
        texts += [f.format(she="", her="", v="", a_v="", ing="", glasses="", v_earrings="") for f in forms]
    for forms, _ in _YESNO_PRESENCE.values():
        texts += [f.format(she="", her="") for f in forms]
    texts += [f.format(she="", her="") for f in _STYLE_YESNO.values()] + list(_EXPRESSION_ING.values())
    texts.append(CAPTION_QUESTION)
    words = set()
    for t in texts:
        words.update(split_words(t))
    return sorted(words)


__all__ = ["caption", "prompt", "vqa_pairs", "parse_caption", "vocabulary", "split_words", "answer_text"]
