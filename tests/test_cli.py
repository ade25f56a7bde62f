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


@pytest.mark.parametrize("argv,match", [
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
    assert report["threshold_decoding"][0]["steps_run"] <= 2
    assert 0 <= report["bf16_agreement"]["token_agreement"] <= 1
    with Image.open(png) as img:
        assert img.size[0] > 100 and img.size[1] > 100
    assert "generate" in stdout and "reference" in stdout


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
