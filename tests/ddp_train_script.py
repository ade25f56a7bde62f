"""Run by test_train.py under torchrun: train the tiny model 4 steps on a fixed global batch, write the losses."""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from conftest import word_tokenizer  # noqa: E402

from fastface.config import FaceConfig  # noqa: E402
from fastface.model import FaceTransformer  # noqa: E402
from fastface.train import SyntheticData, TrainSettings, train  # noqa: E402

torch.set_num_threads(1)
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    dist.init_process_group("gloo")
# aux loss and Noise-expert draws are per-process quantities; switch them off for the comparison
cfg = FaceConfig.from_name("tiny", router_aux_loss_coef=0.0, seq_noise_std=0.0)
model = FaceTransformer(cfg)
model.reset_parameters(0)
history = train(model, SyntheticData(cfg, size=16), word_tokenizer(cfg.text_vocab_size),
                TrainSettings(steps=4, batch_size=8, lr=2e-3, warmup=1), progress=False)
if not dist.is_initialized() or dist.get_rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump([h["loss"] for h in history], f)
if dist.is_initialized():
    dist.barrier()  # no rank tears the group down while another still talks to it
    dist.destroy_process_group()
    # Leave without interpreter finalisation: gloo's transport threads can abort the process while it is torn down
    # ("terminate called without an active exception", seen once in CI), after the losses are written.
    sys.stdout.flush()
    os._exit(0)
