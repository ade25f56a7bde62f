"""The command line on a random-weight tiny checkpoint: commands run, bad input fails cleanly."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fastface import cli
from fastface.grid import image_grid, output_paths


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["answer", "--help"], ["bench", "--help"],
                                  ["train", "--help"], ["eval", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    assert "usage: fastface" in capsys.readouterr().out


def test_generate_tokens_then_answer(tiny_checkpoint, tmp_path, capsys):
    tokens = tmp_path / "t.npy"
    code, out, err = run(["generate", "w1 w2", "w3", "--num-images", "2", "--steps", "3", "--seed", "5", "--model",
                          str(tiny_checkpoint), "--tokens", str(tokens), "--quiet"], capsys)
    assert code == 0, err
    ids = np.load(tokens)
    assert ids.shape == (4, 16) and ids.dtype == np.int64 and ((ids >= 0) & (ids < 64)).all()
    import fastface

    pipe = fastface.load(tiny_checkpoint, backend="reference")
    want = pipe.generate_tokens(["w1 w2", "w1 w2", "w3", "w3"], steps=3, seed=5)
    assert (ids == want.numpy()).all(), "the CLI draws what the reference draws"
    code, out, err = run(["answer", str(tokens), "w4 w5", "--model", str(tiny_checkpoint)], capsys)
    assert code == 0, err
    assert out.endswith("\n") and "Traceback" not in err


def test_threshold_and_bf16_run(tiny_checkpoint, tmp_path, capsys):
    code, _, err = run(["generate", "w1", "--steps", "4", "--threshold", "0.5", "--dtype", "bfloat16", "--model",
                        str(tiny_checkpoint), "--tokens", str(tmp_path / "t.npy"), "--quiet"], capsys)
    assert code == 0, err


def test_int8_weights_generate_and_answer(tiny_checkpoint, tmp_path, capsys):
    """--weights int8 draws what the library's int8 pipeline draws, and answers."""
    tokens = tmp_path / "t.npy"
    code, _, err = run(["generate", "w1 w2", "--steps", "3", "--seed", "2", "--weights", "int8", "--backend",
                        "reference", "--model", str(tiny_checkpoint), "--tokens", str(tokens), "--quiet"], capsys)
    assert code == 0, err
    import fastface

    pipe = fastface.load(tiny_checkpoint, backend="reference", weights="int8")
    assert (np.load(tokens) == pipe.generate_tokens(["w1 w2"], steps=3, seed=2).numpy()).all()
    code, out, err = run(["answer", str(tokens), "w4", "--weights", "int8", "--model", str(tiny_checkpoint)], capsys)
    assert code == 0 and out.endswith("\n"), err


@pytest.mark.parametrize("argv,match", [
    (["generate", "w1", "--weights", "int4"], "invalid choice"),
    (["generate", "w1", "--steps", "0"], "must be > 0"),
    (["generate", "w1", "--steps", "-2"], "must be > 0"),
    (["generate", "w1", "--steps", "two"], "expected an integer"),
    (["generate", "w1", "--backend", "gpu"], "invalid choice"),
    (["generate", "w1", "--guidance", "nan"], "must be finite"),
    (["generate", "w1", "--threshold", "1.5"], r"\(0, 1\]"),
    (["generate", "w1", "--seed", "-1"], "must be >= 0"),
    (["generate"], "PROMPT"),
    (["answer", "only-one-arg"], "question"),
])
def test_bad_arguments_exit_2(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert __import__("re").search(match, err), err
    assert "Traceback" not in err


def test_clean_errors(tiny_checkpoint, tmp_path, capsys):
    ckpt = ["--model", str(tiny_checkpoint)]
    cases = [
        (["answer", str(tmp_path / "missing.png"), "w1", *ckpt], "does not exist"),
        (["generate", "w1", "--model", str(tmp_path / "nowhere")], "does not exist"),
        (["generate", "w1", "-o", str(tmp_path / "no" / "dir.png"), *ckpt], "does not exist"),
        (["generate", "w1", *ckpt], "no image tokenizer"),
        (["eval"] if "eval" in cli._UNAVAILABLE else ["answer", str(tmp_path / "x.npy"), "w1", *ckpt], ""),
    ]
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"not a png at all")
    cases.append((["answer", str(bad_png), "w1", *ckpt], "cannot read image"))
    good_png = tmp_path / "face.png"
    Image.new("RGB", (64, 64), (200, 150, 120)).save(good_png)
    cases.append((["answer", str(good_png), "w1", *ckpt], "image tokenizer"))
    floats = tmp_path / "floats.npy"
    np.save(floats, np.zeros((1, 16), dtype=np.float32))
    cases.append((["answer", str(floats), "w1", *ckpt], "integer codebook ids"))
    out_of_range = tmp_path / "big.npy"
    np.save(out_of_range, np.full((1, 16), 999, dtype=np.int64))
    cases.append((["answer", str(out_of_range), "w1", *ckpt], "image token ids"))
    cases.append((["answer", str(out_of_range), "  ", *ckpt], "question is empty"))
    for argv, match in cases:
        code, _, err = run(argv, capsys)
        assert code == 2, (argv, err)
        assert err.startswith(f"fastface {argv[0]}: error:") and match in err, (argv, err)
        assert "Traceback" not in err


def test_entry_point_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastface.cli", "answer", str(tmp_path / "nope.png"), "q"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_writes_json_and_plot(tiny_checkpoint, tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code, stdout, err = run(["bench", "--model", str(tiny_checkpoint), "--batch", "1", "2", "--steps", "2",
                             "--repeats", "2", "--warmup", "0", "--thresholds", "0.5", "--json", str(out),
                             "--plot", str(png)], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert {"time_utc", "torch", "cpu", "git_commit", "fastface"} <= set(report["machine"])
    rows = report["results"]
    keys = {(r["task"], r["backend"], r["dtype"], r["batch"]) for r in rows}
    for task in ("generate", "answer"):
        for batch in (1, 2):
            assert (task, "reference", "float32", batch) in keys
            assert (task, "auto", "float32", batch) in keys and (task, "auto", "bfloat16", batch) in keys
    for r in rows:
        assert r["tokens_per_s"] > 0 and len(r["seconds"]) == 2 and r["min_s"] <= r["median_s"] <= r["max_s"]
        assert "speedup_vs_reference" in r
        if r["backend"] != "reference" and r["task"] == "generate":
            assert {"attention", "moe", "lm_head", "sampler"} <= set(r["breakdown_s"])
    for r in rows:
        if r["task"] == "generate":
            peak = report["machine"]["gemm_gflops"][r["math_dtype"]]
            assert r["gflop"] > 0 and r["gemm_peak_fraction"] == pytest.approx(r["gflops_per_s"] / peak, abs=1e-3)
    assert "GEMM peak" in stdout
    assert report["threshold_decoding"][0]["steps_run"] <= 2
    assert 0 <= report["bf16_agreement"]["token_agreement"] <= 1
    with Image.open(png) as img:
        assert img.size[0] > 100 and img.size[1] > 100
    assert "generate" in stdout and "reference" in stdout


def test_bench_weights_int8_is_a_contender_beside_float(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, err = run(["bench", "--model", str(tiny_checkpoint), "--batch", "2", "--steps", "2", "--repeats",
                             "1", "--warmup", "0", "--dtypes", "float32", "--weights", "float", "int8",
                             "--thresholds", "--json", str(out)], capsys)
    assert code == 0, err
    rows = json.loads(out.read_text())["results"]
    got = {(r["task"], r["backend"], r["weights"]) for r in rows}
    assert got == {(t, b, w) for t in ("generate", "answer") for b, w in
                   (("reference", "float"), ("auto", "float"), ("auto", "int8"))}
    assert all("speedup_vs_reference" in r for r in rows)
    assert "int8" in stdout


def test_bench_preset_is_honoured_beside_the_embedded_model(tmp_path, capsys):
    """--preset NAME benchmarks random weights of that shape even though the embedded model is installed."""
    out = tmp_path / "bench.json"
    code, _, err = run(["bench", "--preset", "tiny", "--batch", "1", "--steps", "1", "--repeats", "1", "--warmup",
                        "0", "--backends", "auto", "--dtypes", "float32", "--no-answer", "--thresholds",
                        "--json", str(out)], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["model"] == "random weights, preset tiny" and report["config"]["name"] == "tiny"
    code, _, err = run(["bench", "--preset", "tiny", "--model", str(tmp_path)], capsys)
    assert code == 2 and "not both" in err and "Traceback" not in err


def test_bench_times_contenders_in_turn_and_ratios_per_repeat(monkeypatch):
    """Contenders of one case alternate repeat by repeat; a speed-up is the median of per-repeat ratios."""
    from fastface import benchmark

    calls = []
    clock = iter(range(1000))
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: float(next(clock)))
    times = benchmark._time_in_turn({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "a", "b", "a", "b"] and times == {"a": [1.0] * 3, "b": [1.0] * 3}
    rows = [dict(task="generate", backend="reference", dtype="float32", seconds=[2.0, 4.0, 2.0]),
            dict(task="generate", backend="auto", dtype="float32", seconds=[1.0, 1.0, 2.0]),
            dict(task="answer", backend="auto", dtype="float32", seconds=[1.0])]
    benchmark._add_speedups(rows)
    assert rows[1]["speedup_vs_reference"] == 2.0 and rows[1]["speedup_spread"] == [1.0, 4.0]
    assert rows[0]["speedup_vs_reference"] == 1.0 and "speedup_vs_reference" not in rows[2]


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    from fastface import benchmark

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails: the PIL drawing is used
    rows = [dict(task="generate", backend=b, dtype="float32", batch=n, tokens_per_s=v)
            for b, k in (("reference", 1.0), ("auto", 3.0)) for n, v in ((1, 10 * k), (4, 30 * k), (16, 50 * k))]
    path = benchmark.plot(rows, tmp_path / "p.png")
    with Image.open(path) as img:
        assert img.size == (720, 480)


def test_grid_and_output_paths(tmp_path):
    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(5)]
    grid = image_grid(images)
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2)
    assert output_paths(tmp_path / "face", 1) == [tmp_path / "face.png"]
    assert output_paths(tmp_path / "f.png", 3)[2] == tmp_path / "f-3.png"
    with pytest.raises(ValueError):
        image_grid([])


# ------------------------------------------------------------------- image input, clean errors, atomic outputs
@pytest.fixture
def vq_checkpoint(tmp_path, tiny_config):
    """A random-weight tiny checkpoint with an image tokenizer (64x64 pixels <-> 4x4 tokens): writes PNGs."""
    import torch
    from conftest import word_tokenizer

    from fastface.checkpoint import save_checkpoint
    from fastface.model import FaceTransformer
    from fastface.vq.model import VQConfig, VQModel

    torch.manual_seed(0)
    model = FaceTransformer(tiny_config)
    model.reset_parameters(5)
    vq = VQModel(VQConfig(image_size=64, channels=(4, 4, 4, 4, 4), enc_blocks=(0,) * 5, dec_blocks=(0,) * 5,
                          codebook_size=tiny_config.codebook_size, code_dim=8))
    return save_checkpoint(tmp_path / "tiny-vq", model, word_tokenizer(tiny_config.text_vocab_size), vq)


def one_line_error(code, err, command):
    assert code == 2, err
    assert err.startswith(f"fastface {command}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def png_with_header_size(path, width, height):
    """A 1x1 PNG whose IHDR claims ``width`` x ``height`` (CRC fixed)."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_answer_reads_16bit_png_as_gray(vq_checkpoint, tmp_path, capsys, monkeypatch):
    from fastface.pipeline import Pipeline

    seen = []
    monkeypatch.setattr(Pipeline, "answer", lambda self, images, questions, **kw: seen.append(images) or ["ok"])
    path = tmp_path / "gray16.png"
    Image.fromarray(np.full((64, 64), 0x8080, dtype=np.uint16)).save(path)
    code, out, err = run(["answer", str(path), "what colour is her hair?", "--model", str(vq_checkpoint)], capsys)
    assert code == 0, err
    assert out == "ok\n"
    (img,) = seen[0]
    assert img.mode == "RGB" and (np.asarray(img) == 128).all(), "mid-gray, not white"


def test_answer_png_end_to_end(vq_checkpoint, tmp_path, capsys):
    path = tmp_path / "face.png"
    Image.new("RGBA", (80, 48), (200, 150, 120, 255)).save(path)  # any size: resized to the model's 64x64
    code, out, err = run(["answer", str(path), "w1 w2", "--model", str(vq_checkpoint)], capsys)
    assert code == 0, err
    assert out.endswith("\n") and out.strip()


@pytest.mark.parametrize("width,height,match", [(30000, 30000, "decompression bomb"),
                                                (10000, 10000, "decompression bomb"),  # Pillow's warning range
                                                (9000, 9000, "at most 8192x8192")])
def test_answer_huge_header_is_one_line(width, height, match, vq_checkpoint, tmp_path, capsys):
    path = png_with_header_size(tmp_path / "big.png", width, height)
    code, _, err = run(["answer", str(path), "w1", "--model", str(vq_checkpoint)], capsys)
    one_line_error(code, err, "answer")
    assert match in err, err


def _npy_cases(tmp_path):
    import zipfile

    cases = {}

    def save(name, array, **kw):
        path = tmp_path / name
        with open(path, "wb") as f:
            np.save(f, array, **kw)
        cases[name] = path

    save("scalar.npy", np.array(3, dtype=np.int64))  # 0-d
    save("cube.npy", np.zeros((1, 4, 4), dtype=np.int64))
    save("no-rows.npy", np.zeros((0, 16), dtype=np.int64))
    save("no-ids.npy", np.zeros((0,), dtype=np.int64))
    save("floats.npy", np.zeros(16, dtype=np.float64))
    save("bools.npy", np.zeros(16, dtype=bool))
    save("objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    save("long-row.npy", np.zeros((1, 70000), dtype=np.int16))
    save("wrong-length.npy", np.zeros((1, 15), dtype=np.int64))
    (tmp_path / "empty.npy").write_bytes(b"")
    cases["empty.npy"] = tmp_path / "empty.npy"
    whole = (tmp_path / "scalar.npy").read_bytes()
    save("full.npy", np.zeros((4, 16), dtype=np.int64))
    (tmp_path / "truncated.npy").write_bytes((tmp_path / "full.npy").read_bytes()[:-40])
    cases["truncated.npy"] = tmp_path / "truncated.npy"
    (tmp_path / "png.npy").write_bytes(b"\x89PNG\r\n\x1a\n" + whole)
    cases["png.npy"] = tmp_path / "png.npy"
    with zipfile.ZipFile(tmp_path / "archive.npy", "w") as z:
        z.writestr("a.npy", whole)
    cases["archive.npy"] = tmp_path / "archive.npy"
    del cases["full.npy"]
    return cases


def test_answer_bad_token_files_are_one_line(tiny_checkpoint, tmp_path, capsys):
    for name, path in _npy_cases(tmp_path).items():
        code, _, err = run(["answer", str(path), "w1", "--model", str(tiny_checkpoint)], capsys)
        one_line_error(code, err, "answer")
        assert name in err, (name, err)


def test_answer_one_row_token_file_works(tiny_checkpoint, tmp_path, capsys):
    path = tmp_path / "ids.npy"
    np.save(path, np.arange(16, dtype=np.uint8))  # [N], any integer dtype
    code, out, err = run(["answer", str(path), "w1", "--model", str(tiny_checkpoint)], capsys)
    assert code == 0, err


@pytest.mark.parametrize("content", [b"", b"GIF89a broken", b"\x89PNG\r\n\x1a\n" + b"\0" * 40, None])
def test_answer_unreadable_image_is_one_line(content, vq_checkpoint, tmp_path, capsys):
    path = tmp_path / "x.png"
    if content is not None:
        path.write_bytes(content)
    code, _, err = run(["answer", str(path), "w1", "--model", str(vq_checkpoint)], capsys)
    one_line_error(code, err, "answer")
    assert ("cannot read image" if content is not None else "does not exist") in err, err


def _unwritable_dir():
    import os
    import tempfile

    for folder in ("/sys", "/proc"):
        if os.path.isdir(folder):
            try:
                fd, probe = tempfile.mkstemp(dir=folder)
            except OSError:
                return folder
            os.close(fd)
            os.unlink(probe)
    return None


@pytest.mark.skipif(_unwritable_dir() is None, reason="no unwritable directory (/sys, /proc) on this machine")
@pytest.mark.parametrize("option", ["-o", "--tokens"])
def test_generate_unwritable_output_is_one_line(option, vq_checkpoint, tmp_path, capsys, monkeypatch):
    from fastface.pipeline import Pipeline

    def no_generation(*a, **k):
        raise AssertionError("the destination is checked before generating")

    monkeypatch.setattr(Pipeline, "generate_tokens", no_generation)
    target = f"{_unwritable_dir()}/face.{'png' if option == '-o' else 'npy'}"
    extra = ["-o", str(tmp_path / "ok.png")] if option == "--tokens" else []
    code, _, err = run(["generate", "w1", "--steps", "1", option, target, *extra, "--model", str(vq_checkpoint),
                        "--quiet"], capsys)
    one_line_error(code, err, "generate")
    assert "cannot write" in err and target in err, err


def test_generate_output_errors_are_one_line(vq_checkpoint, tmp_path, capsys):
    ckpt = ["--model", str(vq_checkpoint), "--quiet", "--steps", "1"]
    (tmp_path / "file").write_text("x")
    cases = [
        (["-o", str(tmp_path / "file" / "face.png")], "is not a directory"),
        (["-o", str(tmp_path / "newdir") + "/"], "does not exist"),
        (["-o", str(tmp_path / "face.xyz")], "extension '.xyz'"),
        (["--tokens", str(tmp_path / "none" / "t.npy")], "does not exist"),
    ]
    for argv, match in cases:
        code, _, err = run(["generate", "w1", *argv, *ckpt], capsys)
        one_line_error(code, err, "generate")
        assert match in err, (argv, err)


def test_generate_into_a_directory(vq_checkpoint, tmp_path, capsys):
    ckpt = ["--model", str(vq_checkpoint), "--quiet", "--steps", "1"]
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, err = run(["generate", "w1", "-o", str(out), "--tokens", str(out), *ckpt], capsys)
    assert code == 0, err
    assert stdout.split() == [str(out / "tokens.npy"), str(out / "face.png")]
    assert not (tmp_path / "out.png").exists(), "never beside the directory"
    with Image.open(out / "face.png") as img:
        assert img.size == (64, 64) and img.format == "PNG"
    assert np.load(out / "tokens.npy").shape == (1, 16)
    code, stdout, err = run(["generate", "w1", "-o", str(out), "--num-images", "2", "--grid", *ckpt], capsys)
    assert code == 0, err
    assert stdout.split() == [str(out / n) for n in ("face-1.png", "face-2.png", "face-grid.png")]
    code, stdout, err = run(["generate", "w1", "-o", str(out / "f.jpg"), "--tokens", str(out / "ids"), *ckpt],
                            capsys)
    assert code == 0, err
    assert stdout.split() == [str(out / "ids.npy"), str(out / "f.jpg")], "numpy's rule: .npy is appended"
    with Image.open(out / "f.jpg") as img:
        assert img.format == "JPEG"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["face.png", "face-1.png", "face-2.png", "face-grid.png", "tokens.npy", "f.jpg", "ids.npy"]), "no temp files"


def test_generate_help_documents_directory_output(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "existing directory DIR means DIR/face.png" in text and "renamed into place" in text


@pytest.mark.parametrize("what", ["image", "tokens"])
def test_failed_write_keeps_the_old_file(what, vq_checkpoint, tmp_path, capsys, monkeypatch):
    import errno

    target = tmp_path / ("face.png" if what == "image" else "t.npy")
    target.write_bytes(b"old content")

    def half_write_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a fi")
        raise OSError(errno.ENOSPC, "No space left on device")

    if what == "image":
        monkeypatch.setattr(Image.Image, "save", lambda self, fp, *a, **k: half_write_then_fail(fp))
    else:
        monkeypatch.setattr(np, "save", lambda f, *a, **k: half_write_then_fail(f.name))
    argv = ["-o", str(target)] if what == "image" else ["-o", str(tmp_path / "f.png"), "--tokens", str(target)]
    code, _, err = run(["generate", "w1", *argv, "--steps", "1", "--quiet", "--model", str(vq_checkpoint)], capsys)
    one_line_error(code, err, "generate")
    assert "No space left on device" in err, err
    assert target.read_bytes() == b"old content", "the old file is intact"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "tiny-vq") == [target.name], "no temp file left"

