"""Image input (fastface.images): every Pillow mode becomes the RGB Pillow's rules give (16-bit scaled, alpha over
white), the size is bounded before decoding, and the pipeline uses the same conversion."""

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fastface.images import BACKGROUND, MAX_SIDE, ImageError, open_image, to_rgb


def rgb(img) -> np.ndarray:
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == img.size
    return np.asarray(out)


def png_with_header_size(path, width, height):
    """A 1x1 PNG whose IHDR claims ``width`` x ``height`` (CRC fixed): cheap to write, a bomb if decoded."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16bit_gray_is_scaled_not_clipped(mode):
    values = np.array([[0, 0x00FF, 0x1234], [0x8080, 0xFF00, 0xFFFF]], dtype=np.uint16)  # [2, 3]
    raw = values.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
    img = Image.frombytes(mode, (3, 2), raw)
    want = (values >> 8).astype(np.uint8)
    assert (rgb(img) == want[..., None]).all()


def test_16bit_gray_png_file_reads_mid_gray(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.full((8, 8), 0x8080, dtype=np.uint16)).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I;16")
    assert (np.asarray(open_image(path)) == 128).all(), "mid-gray, not white"


def test_16bit_pgm_opens_as_mode_i_and_is_scaled(tmp_path):
    path = tmp_path / "gray16.pgm"
    path.write_bytes(b"P5 2 1 65535\n" + np.array([0x4000, 0xC0FF], dtype=">u2").tobytes())
    with Image.open(path) as img:
        assert img.mode == "I"
    assert open_image(path).getpixel((0, 0)) == (0x40,) * 3 and open_image(path).getpixel((1, 0)) == (0xC0,) * 3


def test_mode_i_is_clipped_to_16_bits():
    img = Image.fromarray(np.array([[-5, 70000, 0x7F00]], dtype=np.int32))
    assert img.mode == "I"
    assert (rgb(img)[0, :, 0] == [0, 255, 0x7F]).all()


def test_float_follows_pillows_rule():
    img = Image.fromarray(np.array([[-3.0, 0.0, 100.0, 254.9, 1e6]], dtype=np.float32))
    want = np.asarray(img.convert("L"))
    assert (rgb(img) == want[..., None]).all()
    assert rgb(img)[0, 0, 0] == 0 and rgb(img)[0, 4, 0] == 255


@pytest.mark.parametrize("mode,colour", [("L", 77), ("1", 1), ("1", 0), ("CMYK", (0, 255, 255, 0)),
                                         ("CMYK", (10, 200, 30, 40)), ("YCbCr", (120, 90, 200)),
                                         ("RGB", (1, 2, 3))])
def test_opaque_modes_follow_pillows_rule(mode, colour):
    img = Image.new(mode, (3, 2), colour)
    assert (rgb(img) == np.asarray(img.convert("RGB"))).all()


def test_cmyk_red_and_bilevel_values():
    assert (rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))) == [255, 0, 0]).all()
    assert (rgb(Image.new("1", (2, 2), 1)) == 255).all() and (rgb(Image.new("1", (2, 2), 0)) == 0).all()


def test_palette_transparent_index_is_background(tmp_path):
    img = Image.new("P", (2, 1), 0)
    img.putpalette([10, 20, 30, 200, 100, 50])
    img.putpixel((1, 0), 1)
    path = tmp_path / "p.png"
    img.save(path, transparency=0)  # index 0 (10, 20, 30) is transparent
    with Image.open(path) as reopened:
        assert reopened.mode == "P" and reopened.info.get("transparency") == 0
    out = np.asarray(open_image(path))
    assert tuple(out[0, 0]) == BACKGROUND, "the colour under the transparent index must not show"
    assert tuple(out[0, 1]) == (200, 100, 50)


def test_palette_with_rgba_palette_is_composited():
    img = Image.new("P", (1, 1), 0)
    img.putpalette([0, 0, 0, 0], "RGBA")  # index 0: black, fully transparent
    assert tuple(rgb(img)[0, 0]) == BACKGROUND


@pytest.mark.parametrize("mode,pixel,want", [
    ("RGBA", (255, 0, 0, 0), BACKGROUND),  # fully transparent: the background, not the hidden red
    ("RGBA", (255, 0, 0, 255), (255, 0, 0)),
    ("RGBA", (0, 0, 0, 128), (127, 127, 127)),  # half black over white
    ("LA", (0, 0), BACKGROUND),
    ("LA", (40, 255), (40, 40, 40)),
    ("PA", (0, 0), BACKGROUND),
])
def test_alpha_is_composited_over_white(mode, pixel, want):
    img = Image.new(mode, (2, 2), pixel)
    got = rgb(img)
    assert (np.abs(got.astype(int) - np.array(want)) <= 1).all(), (got[0, 0], want)


def test_premultiplied_rgba_is_unpremultiplied_then_composited():
    img = Image.new("RGBa", (1, 1), (100, 0, 0, 128))  # premultiplied: straight red ~ 199
    want = np.asarray(Image.alpha_composite(Image.new("RGBA", (1, 1), (*BACKGROUND, 255)),
                                            img.convert("RGBA")).convert("RGB"))
    assert (rgb(img) == want).all()


def test_transparent_colour_in_16bit_and_rgb_png(tmp_path):
    path = tmp_path / "trns16.png"
    Image.fromarray(np.array([[1000, 0x8080]], dtype=np.uint16)).save(path, transparency=1000)
    out = np.asarray(open_image(path))
    assert tuple(out[0, 0]) == BACKGROUND and tuple(out[0, 1]) == (128, 128, 128)
    path = tmp_path / "trns.png"
    img = Image.new("RGB", (2, 1), (5, 6, 7))
    img.putpixel((1, 0), (9, 9, 9))
    img.save(path, transparency=(5, 6, 7))
    out = np.asarray(open_image(path))
    assert tuple(out[0, 0]) == BACKGROUND and tuple(out[0, 1]) == (9, 9, 9)


def test_unconvertible_mode_is_a_clean_error():
    with pytest.raises(ImageError, match="mode 'La'"):
        to_rgb(Image.new("La", (2, 2)))


def test_size_is_checked_before_decoding(tmp_path):
    # 9000 x 9000 (81 Mpx, under Pillow's own warning) claimed by a 1x1 file: decoding would fail as truncated,
    # so the size message proves the bound came first
    path = png_with_header_size(tmp_path / "wide.png", 9000, 9000)
    with pytest.raises(ImageError, match=f"9000x9000 pixels; at most {MAX_SIDE}x{MAX_SIDE}"):
        open_image(path)
    with pytest.raises(ImageError, match="at most"):
        to_rgb(Image.new("L", (MAX_SIDE + 1, 1)))
    assert to_rgb(Image.new("L", (MAX_SIDE, 1))).size == (MAX_SIDE, 1)


def test_decompression_bomb_header_is_a_clean_error(tmp_path):
    path = png_with_header_size(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(ImageError, match="decompression bomb") as exc:
        open_image(path)
    assert "bomb.png" in str(exc.value)


def test_decompression_bomb_warning_range(tmp_path):
    path = png_with_header_size(tmp_path / "big.png", 10000, 10000)  # 100 Mpx: Pillow warns, the bound refuses
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageError, match="at most"):
        open_image(path)
    with warnings.catch_warnings():  # what the CLI does: the warning is an error, reported as one
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="decompression bomb"):
            open_image(path)


@pytest.mark.parametrize("content", [b"not an image at all", b"", None])
def test_unreadable_files_are_clean_errors(tmp_path, content):
    path = tmp_path / "x.png"
    if content is None:  # a truncated PNG: valid header, half the data
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(ImageError, match="cannot read image"):
        open_image(path)
    with pytest.raises(ImageError, match="cannot read image"):
        open_image(tmp_path / "missing.png")


@pytest.fixture
def vq_pipe(tiny_config):
    """A pipeline with a random-weight image tokenizer sized for the tiny model (64x64 pixels, 4x4 tokens)."""
    from conftest import word_tokenizer

    from fastface.model import FaceTransformer
    from fastface.pipeline import Pipeline
    from fastface.vq.model import VQConfig, VQModel

    torch.manual_seed(0)
    vq = VQModel(VQConfig(image_size=64, channels=(4, 4, 4, 4, 4), enc_blocks=(0,) * 5, dec_blocks=(0,) * 5,
                          codebook_size=tiny_config.codebook_size, code_dim=8))
    return Pipeline(FaceTransformer(tiny_config), word_tokenizer(tiny_config.text_vocab_size), vq.eval(),
                    backend="reference")


def test_pipeline_uses_the_same_conversion(vq_pipe):
    s = vq_pipe.config.image_size
    gray16 = Image.fromarray(np.full((s, s), 0x8080, dtype=np.uint16))
    mid = np.full((s, s, 3), 128, dtype=np.uint8)
    white = np.full((s, s, 3), 255, dtype=np.uint8)
    ids = vq_pipe.encode_images([gray16])
    assert not torch.equal(vq_pipe.encode_images([mid]), vq_pipe.encode_images([white])), "the check means something"
    assert torch.equal(ids, vq_pipe.encode_images([mid])), "16-bit mid-gray encodes as mid-gray, not white"
    hidden_red = Image.new("RGBA", (s, s), (255, 0, 0, 0))
    assert torch.equal(vq_pipe.encode_images([hidden_red]), vq_pipe.encode_images([white]))
    with pytest.raises(ValueError, match="at most"):
        vq_pipe.encode_images([Image.new("L", (MAX_SIDE + 1, 2))])
