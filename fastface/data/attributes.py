"""Face-world attributes: the schema of a face and how one is drawn at random.

A face is fixed by a ``FaceAttributes`` record (20 named attributes plus an identity id).

    rng = np.random.default_rng(0)
    attrs = sample_attributes(rng)                 # identity drawn from rng; identity attributes follow it
    ident = sample_identity(attrs.identity)        # the person's identity attributes and face proportions

Identity fixes the person — gender, age, face shape, skin tone, eye colour, eyebrows, nose and a few
continuous proportions (eye spacing, face width, mouth width) — while hair, expression, accessories,
makeup, clothes and background vary between samples of one identity.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    # identity attributes (fixed by the identity id)
    "gender": ("woman", "man"),
    "age": ("young", "middle-aged", "old"),
    "face_shape": ("oval", "round", "square", "long"),
    "skin_tone": ("pale", "fair", "tan", "brown", "dark"),
    "eye_colour": ("brown", "blue", "green", "grey"),
    "eyebrows": ("straight", "arched", "slanted"),
    "nose": ("small", "medium", "large"),
    # per-sample attributes
    "hair_style": ("bald", "buzz", "short", "long", "curly", "bun", "bob"),
    "hair_colour": ("black", "brown", "blonde", "red", "grey", "white", "pink", "blue"),
    "expression": ("smiling", "neutral", "open", "frowning"),
    "glasses": ("none", "round", "square", "sunglasses"),
    "facial_hair": ("none", "moustache", "beard", "goatee", "stubble"),
    "earrings": ("none", "hoops", "studs"),
    "hat": ("none", "cap", "beanie", "top hat"),
    "hat_colour": ("none", "red", "blue", "green", "black", "yellow"),
    "lipstick": ("none", "red", "pink", "purple"),
    "eye_shadow": ("none", "blue", "purple", "green"),
    "blush": ("no", "yes"),
    "background": ("white", "grey", "blue", "green", "yellow", "pink", "purple"),
    "shirt_colour": ("red", "blue", "green", "black", "white", "yellow"),
}
IDENTITY_ATTRIBUTES = ("gender", "age", "face_shape", "skin_tone", "eye_colour", "eyebrows", "nose")
MAKEUP_ATTRIBUTES = ("lipstick", "eye_shadow", "blush")
N_IDENTITIES = 100_000  # identity ids are drawn from [0, N_IDENTITIES) unless told otherwise


@dataclass(frozen=True)
class FaceAttributes:
    """One face's attributes; every field holds one of ``ATTRIBUTES[name]`` (``identity`` is an int id)."""

    identity: int
    gender: str
    age: str
    face_shape: str
    skin_tone: str
    eye_colour: str
    eyebrows: str
    nose: str
    hair_style: str
    hair_colour: str
    expression: str
    glasses: str
    facial_hair: str
    earrings: str
    hat: str
    hat_colour: str
    lipstick: str
    eye_shadow: str
    blush: str
    background: str
    shirt_colour: str

    def __post_init__(self):
        for name, values in ATTRIBUTES.items():
            value = getattr(self, name)
            if value not in values:
                raise ValueError(f"attribute {name}={value!r} is not one of {values}")
        if (self.hat == "none") != (self.hat_colour == "none"):
            raise ValueError(f"hat={self.hat!r} and hat_colour={self.hat_colour!r} disagree")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def labels(self) -> np.ndarray:
        """Index of each attribute's value in ``ATTRIBUTES`` order -> int64 [len(ATTRIBUTES)]."""
        return np.array([ATTRIBUTES[n].index(getattr(self, n)) for n in ATTRIBUTES], dtype=np.int64)

    def without_makeup(self) -> FaceAttributes:
        return dataclasses.replace(self, lipstick="none", eye_shadow="none", blush="no")

    @property
    def has_makeup(self) -> bool:
        return self.lipstick != "none" or self.eye_shadow != "none" or self.blush == "yes"



def _choice(rng: np.random.Generator, values, p=None):
    return values[int(rng.choice(len(values), p=p))]


def sample_identity(identity: int) -> dict:
    """The identity attributes and face proportions of person ``identity`` (deterministic per id).

    Returns a dict with the ``IDENTITY_ATTRIBUTES`` plus ``proportions`` (face width, eye spacing, eye height
    and mouth width factors near 1).
    """
    if not isinstance(identity, (int, np.integer)) or isinstance(identity, bool) or identity < 0:
        raise ValueError(f"identity must be a non-negative int, got {identity!r}")
    return dict(_identity(int(identity)))


@functools.lru_cache(maxsize=1 << 16)
def _identity(identity: int) -> tuple:
    rng = np.random.default_rng([0x1D, identity])
    out = {
        "gender": _choice(rng, ATTRIBUTES["gender"]),
        "age": _choice(rng, ATTRIBUTES["age"], p=[0.4, 0.3, 0.3]),
        "face_shape": _choice(rng, ATTRIBUTES["face_shape"]),
        "skin_tone": _choice(rng, ATTRIBUTES["skin_tone"]),
        "eye_colour": _choice(rng, ATTRIBUTES["eye_colour"]),
        "eyebrows": _choice(rng, ATTRIBUTES["eyebrows"]),
        "nose": _choice(rng, ATTRIBUTES["nose"]),
    }
    out["proportions"] = tuple(float(v) for v in rng.uniform(0.94, 1.06, size=4))
    return tuple(out.items())


def sample_attributes(rng: np.random.Generator, identity: int | None = None, *,
                      n_identities: int = N_IDENTITIES, identity_offset: int = 0) -> FaceAttributes:
    """Draw a face: identity ``identity`` (or one from ``[offset, offset + n_identities)``) and the rest."""
    if identity is None:
        identity = identity_offset + int(rng.integers(n_identities))
    ident = sample_identity(identity)
    woman = ident["gender"] == "woman"
    age = ident["age"]
    if woman:
        style = _choice(rng, ("short", "long", "curly", "bun", "bob"), p=[0.15, 0.3, 0.2, 0.15, 0.2])
    else:
        style = _choice(rng, ("bald", "buzz", "short", "curly"), p=[0.2, 0.2, 0.4, 0.2] if age != "young"
                        else [0.1, 0.25, 0.45, 0.2])
    if age == "old":
        hair = _choice(rng, ("grey", "white"))
    elif age == "middle-aged":
        hair = _choice(rng, ("black", "brown", "blonde", "red", "grey", "pink", "blue"),
                       p=[0.2, 0.2, 0.15, 0.15, 0.2, 0.05, 0.05])
    else:
        hair = _choice(rng, ("black", "brown", "blonde", "red", "pink", "blue"), p=[0.24, 0.24, 0.2, 0.16, 0.08, 0.08])
    expression = _choice(rng, ATTRIBUTES["expression"])
    glasses = _choice(rng, ATTRIBUTES["glasses"], p=[0.5, 0.17, 0.17, 0.16])
    facial_hair = "none" if woman else _choice(rng, ATTRIBUTES["facial_hair"], p=[0.4, 0.15, 0.15, 0.15, 0.15])
    earrings = _choice(rng, ATTRIBUTES["earrings"], p=[0.5, 0.25, 0.25] if woman else [0.8, 0.1, 0.1])
    if style in ("bald", "buzz", "bun"):
        hat = _choice(rng, ATTRIBUTES["hat"], p=[0.8, 0.0, 0.1, 0.1]) if style == "bald" else "none"
    else:
        hat = _choice(rng, ATTRIBUTES["hat"], p=[0.55, 0.15, 0.15, 0.15])
    hat_colour = "none" if hat == "none" else _choice(rng, ATTRIBUTES["hat_colour"][1:])
    p_makeup = 0.55 if woman else 0.04
    lipstick = _choice(rng, ATTRIBUTES["lipstick"][1:]) if rng.random() < p_makeup else "none"
    eye_shadow = _choice(rng, ATTRIBUTES["eye_shadow"][1:]) if rng.random() < p_makeup else "none"
    blush = "yes" if rng.random() < p_makeup * 0.8 else "no"
    # keep hair, hat and clothes apart from the background so their outlines stay visible
    taken = {hair if style != "bald" else None, hat_colour}
    background = _choice(rng, tuple(b for b in ATTRIBUTES["background"] if b not in taken))
    shirt = _choice(rng, tuple(s for s in ATTRIBUTES["shirt_colour"] if s != background))
    return FaceAttributes(identity=int(identity), **{k: v for k, v in ident.items() if k != "proportions"},
                          hair_style=style, hair_colour=hair, expression=expression, glasses=glasses,
                          facial_hair=facial_hair, earrings=earrings, hat=hat, hat_colour=hat_colour,
                          lipstick=lipstick, eye_shadow=eye_shadow, blush=blush, background=background,
                          shirt_colour=shirt)
