"""VQ image tokenizer: shapes and dtypes, training lowers the loss, save/load round trip, input checks."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastface.vq import VQConfig, VQModel, psnr
from fastface.vq.train import train_vq


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return VQModel.from_name("tiny", **overrides).eval()


def images(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 64, 64, 3), dtype=np.uint8)


def test_config_derived_and_validated():
    cfg = VQConfig()
    assert cfg.grid == 16 and cfg.num_tokens == 256 and cfg.codebook_size >= 512
    assert VQConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="divisible"):
        VQConfig(image_size=62)
    with pytest.raises(ValueError, match="codebook_size"):
        VQConfig(codebook_size=0)
    with pytest.raises(ValueError, match="unknown"):
        VQConfig.from_dict({"colours": 3})
    with pytest.raises(ValueError, match="dec_blocks"):
        VQConfig(dec_blocks=(0, 1))
    with pytest.raises(ValueError, match="pixel shuffle"):
        VQConfig(dec_blocks=(1, 1, 1))


@pytest.mark.parametrize("batch", [1, 3])
def test_encode_decode_shapes_and_dtypes(batch):
    vq = tiny()
    x = images(batch)
    ids = vq.encode(x)
    assert ids.shape == (batch, 256) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < vq.config.codebook_size
    assert torch.equal(ids, vq.encode(torch.from_numpy(x)))
    out = vq.decode(ids)
    assert out.shape == (batch, 64, 64, 3) and out.dtype == torch.uint8
    assert torch.equal(vq.encode(x[:1]), ids[:1]), "a row's tokens do not depend on the batch"


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    vq = VQModel.from_name("tiny")
    x = VQModel.from_pixels(torch.from_numpy(images(8, seed=1)))[:, :, :16, :16]
    x = F.avg_pool2d(x, 3, stride=1, padding=1)  # smoother targets
    opt = torch.optim.Adam(vq.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        recon, ids, commit, _ = vq(x, update_codebook=True)
        loss = F.mse_loss(recon, x) + 0.25 * commit
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert ids.shape == (8, 4, 4)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


def test_train_vq_entry_point(tmp_path):
    from fastface.data.dataset import make_dataset

    faces = make_dataset(24, seed=3, captions=False)["images"]
    cfg = VQConfig(channels=(8, 16, 16), codebook_size=32, code_dim=8)
    model, metrics = train_vq(cfg, steps=6, batch_size=4, crop=16, images=faces[:16], eval_images=faces[16:],
                              out=tmp_path / "vq.safetensors", log=lambda *_: None, threads=None)
    assert metrics["steps"] == 6 and np.isfinite(metrics["held_out_psnr_db"])
    assert (tmp_path / "vq.safetensors").is_file() and (tmp_path / "vq.json").is_file()
    assert psnr(model, faces[16:]) == pytest.approx(metrics["held_out_psnr_db"])
    more, metrics2 = train_vq(steps=2, batch_size=4, crop=None, images=faces[:16], eval_images=faces[16:],
                              init=tmp_path / "vq.safetensors", log=lambda *_: None, threads=None)
    assert more.config == cfg and metrics2["steps"] == 2


def test_dead_codes_are_restarted():
    vq = tiny()
    q = vq.quantizer
    z = F.normalize(torch.randn(64, vq.config.code_dim), dim=1)
    ids = torch.zeros(64, dtype=torch.long)  # every vector on code 0: the rest decay
    for _ in range(400):
        restarted = q.update(z, ids)
        if restarted:
            break
    assert restarted > 0
    assert torch.allclose(q.codebook.norm(dim=1), torch.ones(vq.config.codebook_size), atol=1e-5)


def test_save_load_round_trip_bit_exact(tmp_path):
    vq = tiny(seed=3)
    path = vq.save(tmp_path / "image_tokenizer.safetensors")
    again = VQModel.load(path)
    assert again.config == vq.config
    for (k, a), (k2, b) in zip(vq.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    x = images(2)
    assert torch.equal(vq.encode(x), again.encode(x))
    assert torch.equal(vq.decode(vq.encode(x)), again.decode(again.encode(x)))
    assert json.loads((tmp_path / "image_tokenizer.json").read_text()) == vq.config.to_dict()
    # the checkpoint loader builds the model from the config dict alone
    assert VQModel.from_config_dict(vq.config.to_dict()).config == vq.config


def test_state_dict_is_one_dtype_and_inference_only():
    vq = tiny()
    state = vq.state_dict()
    assert {v.dtype for v in state.values()} == {torch.float32}
    assert "quantizer.codebook" in state and not any("ema" in k for k in state)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        VQModel.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="config"):
        VQModel.load(tmp_path / "bare.safetensors")
    with pytest.raises(TypeError):
        VQModel.from_config_dict([1, 2])


def test_bad_inputs_raise_clear_errors():
    vq = tiny()
    with pytest.raises(TypeError, match="uint8"):
        vq.encode(images(1).astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        vq.encode(np.zeros((1, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        vq.encode(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(TypeError):
        vq.encode([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        vq.decode(torch.full((1, 256), 32))
    with pytest.raises(ValueError, match="-1"):
        vq.decode(torch.full((1, 256), -1))
    with pytest.raises(ValueError, match="shape"):
        vq.decode(torch.zeros((1, 255), dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        vq.decode(torch.zeros((1, 256)))
