"""Face-world renderer: ``FaceAttributes`` -> image, parsing mask and landmarks.

A face is rendered with PIL at 128x128 on a 2x-supersampled canvas, rotated by a small pose angle,
box-filtered down to 64x64 uint8 RGB and lit by a soft gradient. Every sample carries its parsing mask (each
pixel labelled with the class covering most of its area), 5 landmarks and identity.

    face = render(attrs, seed=1)                   # FaceSample: image [64, 64, 3] uint8, parsing, landmarks
    bare = render(attrs, seed=1, makeup=False)     # the same face and pose without lipstick, shadow, blush

Coordinates: geometry is written in 64-pixel units (continuous, the image spans [0, 64]); landmarks are
returned as pixel indices at 64x64 (x = column, y = row), i.e. continuous - 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from fastface.data.attributes import FaceAttributes, sample_identity

# parsing classes (uint8 values of FaceSample.parsing)
PARSING_CLASSES = ("background", "skin", "hair", "brows", "eyes", "nose", "lips", "glasses", "accessories", "clothes")
BACKGROUND, SKIN, HAIR, BROWS, EYES, NOSE, LIPS, GLASSES, ACCESSORIES, CLOTHES = range(len(PARSING_CLASSES))

# landmarks (rows of FaceSample.landmarks)
LANDMARKS = ("left_eye", "right_eye", "nose_tip", "mouth_left", "mouth_right")

IMAGE_SIZE = 64
RENDER_SIZE = 128  # the anti-aliased render; drawn on a 2x supersampled canvas
_SUPERSAMPLE = 2
_CANVAS = RENDER_SIZE * _SUPERSAMPLE
_S = _CANVAS / IMAGE_SIZE  # canvas pixels per 64-pixel unit

# colours (RGB), chosen to stay apart from each other at 64x64
SKIN_RGB = {"pale": (250, 222, 200), "fair": (236, 188, 150), "tan": (205, 150, 100), "brown": (150, 98, 62),
            "dark": (92, 58, 38)}
HAIR_RGB = {"black": (28, 24, 24), "brown": (112, 62, 28), "blonde": (240, 204, 96), "red": (204, 66, 24),
            "grey": (150, 150, 154), "white": (240, 240, 240), "pink": (246, 104, 176), "blue": (40, 92, 226)}
EYE_RGB = {"brown": (110, 56, 20), "blue": (30, 120, 250), "green": (30, 170, 50), "grey": (140, 150, 160)}
HAT_RGB = {"red": (214, 30, 40), "blue": (30, 70, 200), "green": (30, 150, 60), "black": (30, 30, 34),
           "yellow": (250, 210, 30)}
SHIRT_RGB = {"red": (210, 40, 40), "blue": (40, 80, 200), "green": (40, 150, 70), "black": (34, 34, 38),
             "white": (245, 245, 245), "yellow": (248, 214, 40)}
BACKGROUND_RGB = {"white": (246, 246, 246), "grey": (128, 128, 132), "blue": (120, 180, 250),
                  "green": (130, 210, 130), "yellow": (250, 236, 140), "pink": (250, 180, 210),
                  "purple": (170, 130, 220)}
LIPSTICK_RGB = {"red": (214, 16, 40), "pink": (250, 90, 170), "purple": (130, 26, 150)}
SHADOW_RGB = {"blue": (50, 120, 250), "purple": (150, 60, 200), "green": (50, 190, 90)}
BLUSH_RGB = (250, 90, 120)
GOLD = (240, 196, 40)
FRAME = (18, 18, 22)
LENS = (24, 26, 34)
TEETH = (250, 250, 246)
MOUTH_INSIDE = (90, 16, 28)
EYE_WHITE = (250, 250, 250)


@dataclass
class FaceSample:
    """A rendered face: image uint8 [64, 64, 3], parsing uint8 [64, 64], landmarks float32 [5, 2] (x, y)."""

    image: np.ndarray
    parsing: np.ndarray
    landmarks: np.ndarray
    attrs: FaceAttributes
    identity: int


def _mix(a, b, t: float):
    """(1 - t) * a + t * b for RGB tuples."""
    return tuple(int(round((1 - t) * x + t * y)) for x, y in zip(a, b))


class _Canvas:
    """Paints RGB and parsing labels together; coordinates in 64-pixel units."""

    def __init__(self, background):
        self.rgb = Image.new("RGB", (_CANVAS, _CANVAS), background)
        self.lab = Image.new("L", (_CANVAS, _CANVAS), BACKGROUND)
        self.d = ImageDraw.Draw(self.rgb)
        self.dl = ImageDraw.Draw(self.lab)

    @staticmethod
    def _box(x0, y0, x1, y1):
        return (x0 * _S, y0 * _S, x1 * _S - 1, y1 * _S - 1)

    def ellipse(self, cx, cy, rx, ry, fill, label):
        box = self._box(cx - rx, cy - ry, cx + rx, cy + ry)
        self.d.ellipse(box, fill=fill)
        if label is not None:
            self.dl.ellipse(box, fill=label)

    def ring(self, cx, cy, rx, ry, fill, label, width):
        box = self._box(cx - rx, cy - ry, cx + rx, cy + ry)
        w = max(1, int(round(width * _S)))
        self.d.ellipse(box, outline=fill, width=w)
        self.dl.ellipse(box, outline=label, width=w)

    def rect(self, x0, y0, x1, y1, fill, label, radius=0.0):
        box = self._box(x0, y0, x1, y1)
        if radius > 0:
            self.d.rounded_rectangle(box, radius=radius * _S, fill=fill)
            if label is not None:
                self.dl.rounded_rectangle(box, radius=radius * _S, fill=label)
        else:
            self.d.rectangle(box, fill=fill)
            if label is not None:
                self.dl.rectangle(box, fill=label)

    def rect_outline(self, x0, y0, x1, y1, fill, label, width, radius=0.0):
        box = self._box(x0, y0, x1, y1)
        w = max(1, int(round(width * _S)))
        self.d.rounded_rectangle(box, radius=radius * _S, outline=fill, width=w)
        self.dl.rounded_rectangle(box, radius=radius * _S, outline=label, width=w)

    def chord(self, cx, cy, rx, ry, start, end, fill, label):
        box = self._box(cx - rx, cy - ry, cx + rx, cy + ry)
        self.d.chord(box, start, end, fill=fill)
        if label is not None:
            self.dl.chord(box, start, end, fill=label)

    def arc(self, cx, cy, rx, ry, start, end, fill, label, width):
        box = self._box(cx - rx, cy - ry, cx + rx, cy + ry)
        w = max(1, int(round(width * _S)))
        self.d.arc(box, start, end, fill=fill, width=w)
        if label is not None:
            self.dl.arc(box, start, end, fill=label, width=w)

    def line(self, points, fill, label, width):
        pts = [(x * _S, y * _S) for x, y in points]
        w = max(1, int(round(width * _S)))
        self.d.line(pts, fill=fill, width=w, joint="curve")
        if label is not None:
            self.dl.line(pts, fill=label, width=w, joint="curve")

    def polygon(self, points, fill, label):
        pts = [(x * _S, y * _S) for x, y in points]
        self.d.polygon(pts, fill=fill)
        if label is not None:
            self.dl.polygon(pts, fill=label)


@dataclass
class _Pose:
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    angle: float = 0.0  # degrees, counter-clockwise on screen
    light_x: float = 0.0
    light_y: float = 0.0
    brightness: float = 1.0


def _draw_pose(rng: np.random.Generator | None) -> _Pose:
    if rng is None:
        return _Pose()
    u = rng.uniform(-1.0, 1.0, size=7)
    return _Pose(dx=1.5 * u[0], dy=1.2 * u[1], scale=1.0 + 0.05 * u[2], angle=7.0 * u[3], light_x=0.03 * u[4],
                 light_y=0.02 * u[5], brightness=1.0 + 0.02 * u[6])


def _face_outline(c: _Canvas, shape, cx, cy, fw, fh, fill, label):
    if shape == "square":
        c.rect(cx - fw, cy - fh, cx + fw, cy + fh, fill, label, radius=0.55 * fw)
    else:
        c.ellipse(cx, cy, fw, fh, fill, label)


def _draw(attrs: FaceAttributes, pose: _Pose, makeup: bool) -> tuple[_Canvas, np.ndarray, tuple[float, float]]:
    ident = sample_identity(attrs.identity)
    p_face, p_eyes, p_eye_h, p_mouth = ident["proportions"]
    woman = attrs.gender == "woman"
    s = pose.scale
    cx, cy = 32.0 + pose.dx, 30.5 + pose.dy
    fw, fh = {"oval": (12.8, 16.5), "round": (15.0, 15.2), "square": (14.2, 16.0), "long": (11.4, 18.2)}[
        attrs.face_shape]
    fw, fh = fw * s * p_face * (1.0 if woman else 1.05), fh * s
    skin = SKIN_RGB[attrs.skin_tone]
    shade = _mix(skin, (40, 20, 10), 0.28)  # nose, wrinkles
    hair_rgb = HAIR_RGB[attrs.hair_colour]
    brow_rgb = _mix(hair_rgb, (20, 14, 10), 0.35)
    bg = BACKGROUND_RGB[attrs.background]
    c = _Canvas(bg)

    eye_y = cy - 1.2 * s * p_eye_h
    eye_dx = 0.47 * fw * p_eyes / p_face
    mouth_y = cy + 0.62 * fh
    mouth_w = 4.6 * s * p_mouth * (1.1 if attrs.expression == "smiling" else 1.0)
    nose_y = cy + 0.3 * fh
    style = attrs.hair_style
    hat = attrs.hat

    # --- hair behind the head
    top = cy - fh
    if style == "long":
        c.rect(cx - fw - 3.2, top - 2.5, cx + fw + 3.2, cy + fh + 16, hair_rgb, HAIR, radius=6)
    elif style == "bob":
        c.rect(cx - fw - 3.5, top - 2.8, cx + fw + 3.5, cy + 0.55 * fh, hair_rgb, HAIR, radius=5)
    elif style == "curly":
        for k in range(13):
            a = math.pi * (0.92 + 1.16 * k / 12)  # from lower left over the top to lower right
            c.ellipse(cx + (fw + 1.2) * math.cos(a), cy + 0.1 * fh + (fh + 1.5) * math.sin(a), 4.2 * s, 4.2 * s,
                      hair_rgb, HAIR)
    elif style == "bun" and hat == "none":
        c.ellipse(cx, top - 2.8 * s, 5.2 * s, 4.6 * s, hair_rgb, HAIR)

    # --- neck and shirt
    neck_w = (5.6 if woman else 7.0) * s
    c.rect(cx - neck_w, cy + 0.6 * fh, cx + neck_w, 66, _mix(skin, shade, 0.35), SKIN)
    shirt = SHIRT_RGB[attrs.shirt_colour]
    c.ellipse(cx, cy + fh + 15 * s, 24 * s, 11 * s, shirt, CLOTHES)
    c.rect(cx - 24 * s, cy + fh + 15 * s, cx + 24 * s, 68, shirt, CLOTHES)
    if style == "long":  # long hair falls over the shoulders in front of the shirt
        c.rect(cx - fw - 3.2, cy + 0.2 * fh, cx - fw + 1.8, cy + fh + 12, hair_rgb, HAIR, radius=2)
        c.rect(cx + fw - 1.8, cy + 0.2 * fh, cx + fw + 3.2, cy + fh + 12, hair_rgb, HAIR, radius=2)

    # --- ears and face
    ear_y = eye_y + 2.5
    for side in (-1, 1):
        c.ellipse(cx + side * (fw - 0.2), ear_y, 2.4 * s, 3.6 * s, skin, SKIN)
    _face_outline(c, attrs.face_shape, cx, cy, fw, fh, skin, SKIN)
    if attrs.gender == "man" and attrs.face_shape in ("oval", "long"):  # a broader jaw
        c.rect(cx - 0.8 * fw, cy + 0.2 * fh, cx + 0.8 * fw, cy + 0.92 * fh, skin, SKIN, radius=0.35 * fw)

    # --- age: wrinkles. Both older ages have nasolabial folds, crow's feet at the outer eye corners and a
    # forehead line just above the brows (below any fringe); old faces add two high forehead lines, under-eye
    # bags and marionette lines (and have grey or white hair). The middle-aged cues sit where hair, hats and
    # glasses leave skin bare.
    if attrs.age != "young":
        old = attrs.age == "old"
        wrinkle = _mix(skin, (30, 15, 8), 0.45)  # dark enough to show on every skin tone
        c.arc(cx, eye_y - 6.4 * s, 5.0 * s, 1.4 * s, 200, 340, wrinkle, None, 0.8)
        for side in (-1, 1):
            c.line([(cx + side * 2.8 * s, nose_y - 1.0), (cx + side * (mouth_w + 1.6), mouth_y + 1.2)], wrinkle,
                   None, 0.8)
            x0 = cx + side * (eye_dx + 3.4 * s)
            for dy in (-0.9, 0.9):  # crow's feet
                c.line([(x0, eye_y + 0.3 * dy), (x0 + side * 1.7 * s, eye_y + dy * s)], wrinkle, None, 0.7)
        if old:
            c.arc(cx, eye_y - 8.2 * s, 5.5 * s, 1.6 * s, 200, 340, wrinkle, None, 0.7)
            c.arc(cx, eye_y - 9.9 * s, 6.0 * s, 1.6 * s, 200, 340, wrinkle, None, 0.7)
            for side in (-1, 1):  # under-eye bags and marionette lines down from the mouth corners
                c.arc(cx + side * eye_dx, eye_y + 2.2 * s, 2.8 * s, 1.3 * s, 20, 160, wrinkle, None, 0.7)
                c.line([(cx + side * (mouth_w + 0.8), mouth_y + 1.0), (cx + side * (mouth_w + 0.3), mouth_y + 4.2)],
                       wrinkle, None, 0.7)

    # --- makeup: blush and eye shadow (drawn under the eyes and brows)
    if makeup and attrs.blush == "yes":
        for side in (-1, 1):
            c.ellipse(cx + side * (eye_dx + 1.0), nose_y + 0.6, 3.0 * s, 2.0 * s, _mix(skin, BLUSH_RGB, 0.55), None)
    if makeup and attrs.eye_shadow != "none":
        for side in (-1, 1):
            c.ellipse(cx + side * eye_dx, eye_y - 1.5 * s, 4.2 * s, 3.0 * s, SHADOW_RGB[attrs.eye_shadow], None)

    # --- hair on top of the head (hats hide the crown)
    hairline = cy - 0.6 * fh
    if style in ("short", "long", "bob", "curly", "bun"):
        c.chord(cx, hairline, fw + 1.4, hairline - (top - 2.6 * s), 180, 360, hair_rgb, HAIR)
        if style == "bob":  # straight bangs
            c.rect(cx - fw - 0.5, top - 1.0, cx + fw + 0.5, cy - 0.5 * fh, hair_rgb, HAIR, radius=1.5)
        for side in (-1, 1):  # side locks over the temples
            c.rect(cx + side * fw - 2.2, hairline - 1, cx + side * fw + 2.2, eye_y - 1.5, hair_rgb, HAIR)
        if style == "curly":
            for k in range(7):
                c.ellipse(cx - fw + 1.0 + k * (2 * fw - 2.0) / 6, hairline - 0.5, 2.2 * s, 2.2 * s, hair_rgb, HAIR)
    elif style == "buzz":
        c.chord(cx, hairline + 0.8, fw + 0.6, hairline + 0.8 - (top - 0.8), 180, 360,
                _mix(hair_rgb, skin, 0.15), HAIR)

    # --- facial hair (under the mouth and nose)
    beard_rgb = hair_rgb
    fh_style = attrs.facial_hair
    if fh_style == "beard":
        c.chord(cx, nose_y + 1.6, fw + 0.3, cy + 1.05 * fh - nose_y - 1.6, 0, 180, beard_rgb, HAIR)
    elif fh_style == "goatee":
        c.ellipse(cx, mouth_y + 4.0 * s, 3.6 * s, 3.4 * s, beard_rgb, HAIR)
    elif fh_style == "stubble":
        c.chord(cx, nose_y + 1.6, fw - 0.2, cy + fh - nose_y - 1.6, 0, 180, _mix(skin, beard_rgb, 0.5), HAIR)
    if fh_style in ("moustache", "beard", "goatee"):
        c.rect(cx - mouth_w - 0.8, mouth_y - 3.0 * s, cx + mouth_w + 0.8, mouth_y - 0.6, beard_rgb, HAIR, radius=1.2)

    # --- brows
    thick = (1.8 if attrs.gender == "man" else 1.3) * s
    brow_y = eye_y - 4.2 * s
    for side in (-1, 1):
        x = cx + side * eye_dx
        if attrs.eyebrows == "straight":
            pts = [(x - side * 3.4 * s, brow_y), (x + side * 3.4 * s, brow_y)]
        elif attrs.eyebrows == "arched":
            pts = [(x - side * 3.6 * s, brow_y + 1.2), (x, brow_y - 1.5), (x + side * 3.6 * s, brow_y + 1.2)]
        else:  # slanted: low at the nose, high at the temple
            pts = [(x - side * 3.4 * s, brow_y + 1.4), (x + side * 3.4 * s, brow_y - 1.6)]
        c.line(pts, brow_rgb, BROWS, thick)

    # --- eyes
    ew, eh, ir = 3.2 * s, 2.2 * s, 1.9 * s
    iris = EYE_RGB[attrs.eye_colour]
    for side in (-1, 1):
        x = cx + side * eye_dx
        c.ellipse(x, eye_y, ew, eh, EYE_WHITE, EYES)
        c.ellipse(x, eye_y, ir, ir, iris, EYES)
        c.ellipse(x, eye_y, 0.7 * s, 0.7 * s, (10, 10, 12), EYES)
        if woman:  # lashes at the outer corner
            c.line([(x + side * ew * 0.75, eye_y - eh * 0.55), (x + side * (ew + 1.1), eye_y - eh - 0.6)],
                   (20, 16, 16), EYES, 0.6)
    # --- nose
    nlen, nwid = {"small": (3.0, 1.6), "medium": (5.0, 3.0), "large": (7.4, 4.8)}[attrs.nose]
    nlen, nwid = nlen * s, nwid * s
    c.polygon([(cx, nose_y - nlen), (cx - nwid, nose_y + 0.6), (cx + nwid, nose_y + 0.6)], _mix(skin, shade, 0.55),
              NOSE)
    for side in (-1, 1):
        c.ellipse(cx + side * 0.45 * nwid, nose_y + 0.2, 0.55 * nwid, 0.45 * nwid + 0.3, shade, NOSE)

    # --- mouth
    lip_rgb = _mix(skin, (176, 58, 72), 0.55 if woman else 0.4)
    if makeup and attrs.lipstick != "none":
        lip_rgb = LIPSTICK_RGB[attrs.lipstick]
    mw = mouth_w
    ex = attrs.expression
    if ex == "smiling":
        c.chord(cx, mouth_y - 1.0, mw, 3.4 * s, 0, 180, lip_rgb, LIPS)
        c.chord(cx, mouth_y - 0.8, mw - 1.1, 2.2 * s, 0, 180, TEETH, LIPS)
        c.rect(cx - mw + 0.8, mouth_y - 1.4, cx + mw - 0.8, mouth_y - 0.6, lip_rgb, LIPS)
        corners = [(cx - mw, mouth_y - 1.0), (cx + mw, mouth_y - 1.0)]
    elif ex == "neutral":
        c.ellipse(cx, mouth_y, mw, 1.5 * s, lip_rgb, LIPS)
        c.line([(cx - mw + 0.6, mouth_y), (cx + mw - 0.6, mouth_y)], _mix(lip_rgb, (40, 0, 10), 0.5), LIPS, 0.5)
        corners = [(cx - mw, mouth_y), (cx + mw, mouth_y)]
    elif ex == "open":
        c.ellipse(cx, mouth_y + 0.5, 0.75 * mw, 3.4 * s, lip_rgb, LIPS)
        c.ellipse(cx, mouth_y + 0.5, 0.75 * mw - 1.2, 3.4 * s - 1.2, MOUTH_INSIDE, LIPS)
        corners = [(cx - 0.75 * mw, mouth_y + 0.5), (cx + 0.75 * mw, mouth_y + 0.5)]
    else:  # frowning
        c.arc(cx, mouth_y + 2.2, mw, 2.8 * s, 195, 345, lip_rgb, LIPS, 1.6)
        corners = [(cx - mw + 0.3, mouth_y + 1.6), (cx + mw - 0.3, mouth_y + 1.6)]
        c.line([(cx - 1.6, eye_y - 4.6 * s), (cx - 0.6, eye_y - 3.2 * s)], shade, None, 0.4)

    # --- earrings
    if attrs.earrings != "none":
        for side in (-1, 1):
            x, y = cx + side * (fw + 0.2), ear_y + 3.6 * s
            if attrs.earrings == "hoops":
                c.ring(x, y + 2.4 * s, 2.4 * s, 2.6 * s, GOLD, ACCESSORIES, 0.9)
            else:
                c.ellipse(x, y, 1.5 * s, 1.5 * s, GOLD, ACCESSORIES)

    # --- glasses
    g = attrs.glasses
    if g != "none":
        gx, gy = 4.4 * s, 3.6 * s
        for side in (-1, 1):
            x = cx + side * eye_dx
            if g == "round":
                c.ring(x, eye_y, gx, gx, FRAME, GLASSES, 0.9)
            elif g == "square":
                c.rect_outline(x - gx - 0.4, eye_y - gy, x + gx + 0.4, eye_y + gy, FRAME, GLASSES, 0.9, radius=0.6)
            else:
                c.rect(x - gx - 0.3, eye_y - gy + 0.4, x + gx + 0.3, eye_y + gy, LENS, GLASSES, radius=2.6)
            c.line([(x + side * (gx + 0.3), eye_y - 0.8), (cx + side * (fw + 0.6), eye_y - 0.4)], FRAME, GLASSES, 0.8)
        c.line([(cx - eye_dx + gx - 0.2, eye_y - 0.6), (cx, eye_y - 1.4), (cx + eye_dx - gx + 0.2, eye_y - 0.6)],
               FRAME, GLASSES, 0.8)

    # --- hats
    if hat != "none":
        hc = HAT_RGB[attrs.hat_colour]
        band = _mix(hc, (0, 0, 0), 0.35)
        if hat == "cap":
            c.chord(cx, hairline + 0.5, fw + 2.0, hairline + 0.5 - (top - 4.0 * s), 180, 360, hc, ACCESSORIES)
            c.rect(cx - fw - 1.0, hairline - 1.2, cx + fw + 7.5 * s, hairline + 1.6, band, ACCESSORIES, radius=1.2)
            c.ellipse(cx, top - 3.6 * s, 1.3, 1.0, band, ACCESSORIES)
        elif hat == "beanie":
            c.chord(cx, hairline + 1.0, fw + 2.2, hairline + 1.0 - (top - 5.0 * s), 180, 360, hc, ACCESSORIES)
            c.rect(cx - fw - 2.4, hairline - 2.4, cx + fw + 2.4, hairline + 1.6, band, ACCESSORIES, radius=1.0)
            c.ellipse(cx, top - 6.2 * s, 3.0 * s, 3.0 * s, hc, ACCESSORIES)
        else:  # top hat
            c.rect(cx - fw - 5.0 * s, hairline - 1.6, cx + fw + 5.0 * s, hairline + 1.0, hc, ACCESSORIES, radius=1.0)
            c.rect(cx - 0.78 * fw, top - 12.0 * s, cx + 0.78 * fw, hairline - 0.8, hc, ACCESSORIES)
            c.rect(cx - 0.78 * fw, hairline - 4.4, cx + 0.78 * fw, hairline - 2.2, band, ACCESSORIES)

    corners = [(corners[0][0] + 0.5, corners[0][1]), (corners[1][0] - 0.5, corners[1][1])]  # the visible lip ends
    landmarks = np.array([[cx - eye_dx, eye_y], [cx + eye_dx, eye_y], [cx, nose_y - 0.5], corners[0], corners[1]],
                         dtype=np.float64)
    return c, landmarks, (cx, cy)


def area_labels(labels: np.ndarray, k: int) -> np.ndarray:
    """The most frequent label of each k x k block of ``labels`` uint8 [H, W] -> uint8 [H / k, W / k]: the class
    that covers most of each output pixel, as the box-filtered image shows it (ties: the lower class index)."""
    H, W = labels.shape
    h, w = H // k, W // k
    block = (np.arange(H)[:, None] // k * w + np.arange(W)[None, :] // k).ravel()  # output pixel of each sample
    counts = np.bincount(block * len(PARSING_CLASSES) + labels.ravel(), minlength=h * w * len(PARSING_CLASSES))
    return counts.reshape(h, w, len(PARSING_CLASSES)).argmax(-1).astype(np.uint8)


def render(attrs: FaceAttributes, size: int = IMAGE_SIZE, *, makeup: bool = True, seed: int | None = 0,
           jitter: bool = True) -> FaceSample:
    """Render ``attrs`` -> ``FaceSample`` at ``size`` x ``size`` (64: the stored size; 128: the render).

    ``seed`` fixes the pose (shift, scale, roll) and lighting jitter; ``jitter=False`` (or ``seed=None``) gives
    the canonical pose. ``makeup=False`` draws the same face and pose with no lipstick, eye shadow or blush:
    only lip, eye-shadow and cheek pixels change.
    """
    if not isinstance(attrs, FaceAttributes):
        raise TypeError(f"attrs must be FaceAttributes, got {type(attrs).__name__}")
    if size not in (IMAGE_SIZE, RENDER_SIZE):
        raise ValueError(f"size must be {IMAGE_SIZE} or {RENDER_SIZE}, got {size!r}")
    pose = _draw_pose(np.random.default_rng([0x7E, int(seed)]) if (jitter and seed is not None) else None)
    c, landmarks, (cx, cy) = _draw(attrs, pose, makeup)
    # the 128x128 render: box-filter the supersampled canvas, then roll it (rotating at 128 costs a quarter
    # of rotating the canvas: 0.35 -> 0.1 ms per face). The labels are rolled on the canvas itself, so that each
    # output pixel's label can be the class covering most of its area.
    rgb = c.rgb.reduce(_SUPERSAMPLE)
    lab = c.lab
    if abs(pose.angle) > 1e-6:
        center = (cx * RENDER_SIZE / IMAGE_SIZE, cy * RENDER_SIZE / IMAGE_SIZE)
        rgb = rgb.rotate(pose.angle, resample=Image.BICUBIC, center=center, fillcolor=BACKGROUND_RGB[attrs.background])
        canvas_center = (center[0] * _SUPERSAMPLE, center[1] * _SUPERSAMPLE)
        lab = lab.rotate(pose.angle, resample=Image.NEAREST, center=canvas_center,
                         fillcolor=BACKGROUND)
        t = math.radians(pose.angle)
        d = landmarks - (cx, cy)
        # counter-clockwise on screen (y points down)
        landmarks = np.stack([cx + d[:, 0] * math.cos(t) + d[:, 1] * math.sin(t),
                              cy - d[:, 0] * math.sin(t) + d[:, 1] * math.cos(t)], axis=1)
    factor = RENDER_SIZE // size
    img = np.asarray(rgb.reduce(factor) if factor > 1 else rgb, dtype=np.float32)
    # lighting: a soft linear gradient and a global brightness
    ramp = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    light = pose.brightness + 2 * pose.light_x * ramp[None, :] + 2 * pose.light_y * ramp[:, None]
    img = np.clip(img * light[:, :, None] + 0.5, 0, 255).astype(np.uint8)
    parsing = area_labels(np.asarray(lab, dtype=np.uint8), _CANVAS // size)
    landmarks = (landmarks * (size / IMAGE_SIZE) - 0.5).astype(np.float32)
    return FaceSample(image=img, parsing=parsing, landmarks=landmarks, attrs=attrs, identity=attrs.identity)
