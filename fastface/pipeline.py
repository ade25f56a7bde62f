"""The user-facing pipeline: load a checkpoint, draw faces from text, answer questions about faces.

    pipe = fastface.load()                                    # the embedded default model, offline
    tokens = pipe.generate_tokens(["a smiling woman with red hair"], steps=16, guidance=2.0, seed=0)
    images = pipe.generate(["a smiling woman with red hair"])  # list of PIL images
    answers = pipe.answer(images, ["what colour is her hair?"])
    scores = pipe.similarity(images, ["a smiling woman", "an old man"])  # face-text cosine [I, T]
    captions = pipe.describe(images)                          # captions decoded in parallel (masked diffusion)
    captions, images = pipe.generate_pairs(4)                 # caption and face drawn together
    edited = pipe.edit(images[0], "a man with blue hair", "hair")  # re-draw the hair, keep every other token
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastface import backends
from fastface.checkpoint import DTYPES, load_checkpoint, load_embedder
from fastface.checks import (
    DTYPE_NAMES,
    MAX_NEW_TOKENS,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    WEIGHT_FORMATS,
    check_bounded,
    check_choice,
    check_int,
    check_probability,
    check_strings,
)
from fastface.config import SPECIAL_TOKENS
from fastface.decoding import Decoder
from fastface.images import to_rgb
from fastface.prompts import block_text, mmu_prompt_ids, t2i_prompt_ids, text_block_length
from fastface.quantization import quantize_int8
from fastface.tokenizer import encode_text, text_only

DEFAULT_MODEL = Path(__file__).parent / "assets" / "face-s"


class Pipeline:
    """A loaded model with its text and image tokenizers.

    Safe to share across threads: every call returns exactly what it returns alone (``fastface.decoding``).
    """

    def __init__(self, model, tokenizer, image_tokenizer=None, *, backend: str = "auto", embedder=None):
        self.model = model.eval()
        # the model's understanding embeddings (a FaceTextModel: e_sem, e_id), when it was trained with them
        self.embedder = embedder
        if embedder is not None:
            from fastface.checkpoint import check_embedder

            check_embedder(embedder, model.config, "Pipeline")
        self._facetext = embedder
        self._perception = None
        self.config = model.config
        self.tokenizer = text_only(tokenizer)  # special-token text in a prompt is text, never a control token
        self.image_tokenizer = image_tokenizer
        self.backend = backends.validate_choice(backend)
        self.model.set_backend(self.backend)
        self.decoder = Decoder(self.model, self.backend)  # reference loops or the engine

    @property
    def engine(self):
        """The fast decoding engine (``fastface.engine.Engine``), or None with ``backend="reference"``."""
        return self.decoder.engine

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed.weight.dtype

    # ------------------------------------------------------------------------------------------ text
    def encode_text(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)

    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i >= len(SPECIAL_TOKENS)])

    # ------------------------------------------------------------------------------------ generation
    def generate_tokens(self, prompts, steps: int = 16, guidance: float = 2.0, seed: int | list[int] = 0, *,
                        sample_temperature: float = 1.0, confidence_temperature: float = 4.5,
                        schedule: str = "cosine", threshold: float | None = None, confidence_compounding: bool = False,
                        guidance_steps: int | None = None, uncond_refresh: int | None = None,
                        kv_refresh: int | None = None,
                        callback=None) -> torch.Tensor:
        """Codebook ids [B, N] (int64) of one image per prompt.

        ``seed`` is an int (prompt b uses seed + b) or one seed per prompt; a prompt's tokens depend only on
        its own seed, never on the rest of the batch. ``backend="reference"`` runs the reference loop (a full
        forward every step); every other backend runs the engine, which returns the same tokens.
        ``threshold`` (opt-in, every backend) also accepts every masked token whose sampled probability reaches
        it, so decoding may finish in fewer steps. ``confidence_compounding`` is Show-o's compounding confidence
        temperature (off by default; ``fastface.sampling.DECODING_PRESETS`` holds Show-o's settings:
        ``pipe.generate_tokens(prompts, **DECODING_PRESETS["showo-256"])``). ``callback(step, tokens, masked)``
        runs after each step.

        Faster than exact, opt-in (measured speed and quality: README, "Faster than exact"): ``guidance_steps=k``
        guides the first k steps only (later steps skip the unconditional rows); ``uncond_refresh=r`` runs the
        unconditional rows every r-th guided step, the steps between guided by their last logits; ``kv_refresh=r``
        (the engine only)
        runs the whole image every r steps and, in between, only the positions that were still masked, reusing the
        other positions' keys/values.
        """
        prompts = check_strings("prompts", prompts)
        seeds = self._seeds(seed, len(prompts))
        ids = t2i_prompt_ids([self.encode_text(p) for p in prompts], self.config)
        return self.decoder.image_tokens(ids, steps=steps, guidance=guidance, seeds=seeds,
                                         sample_temperature=sample_temperature,
                                         confidence_temperature=confidence_temperature, schedule=schedule,
                                         threshold=threshold, confidence_compounding=confidence_compounding,
                                         guidance_steps=guidance_steps, uncond_refresh=uncond_refresh,
                                         kv_refresh=kv_refresh, callback=callback)

    def generate(self, prompts, steps: int = 16, guidance: float = 2.0, seed: int | list[int] = 0, **kwargs):
        """One PIL image per prompt (decoded by the image tokenizer)."""
        tokens = self.generate_tokens(prompts, steps=steps, guidance=guidance, seed=seed, **kwargs)
        return self.decode_images(tokens)

    def decode_images(self, tokens: torch.Tensor):
        """Codebook ids [B, N] -> B PIL images (an empty batch gives an empty list); each image's pixels are the
        same whatever else is in the batch."""
        from PIL import Image

        if self.image_tokenizer is None:
            raise RuntimeError("this checkpoint has no image tokenizer; use generate_tokens()")
        if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.long:
            raise TypeError(f"tokens must be a LongTensor [B, {self.config.image_tokens}] of codebook ids, "
                            f"got {type(tokens).__name__} {getattr(tokens, 'dtype', '')}")
        tokens = self.encode_images(tokens)  # checks the shape and the id range
        if tokens.shape[0] == 0:
            return []
        # one image at a time: a batched convolution may round differently at another batch size, and an image's
        # pixels must not depend on its neighbours (16 images one by one cost ~0.1 s beside ~14 s of decoding)
        with torch.no_grad():
            pixels = [self.image_tokenizer.decode(row[None])[0] for row in tokens]  # uint8 [64, 64, 3] each
        return [Image.fromarray(np.asarray(p)) for p in pixels]

    # --------------------------------------------------------------------------------- understanding
    def encode_images(self, images) -> torch.Tensor:
        """PIL images, uint8 arrays [B, S, S, 3] / a list of [S, S, 3], or codebook ids [B, N] -> ids [B, N]."""
        if isinstance(images, torch.Tensor) and images.dtype == torch.long:
            if images.dim() != 2 or images.shape[1] != self.config.image_tokens:
                raise ValueError(f"image token ids must have shape [B, {self.config.image_tokens}], "
                                 f"got {tuple(images.shape)}")
            if images.numel() and (int(images.min()) < 0 or int(images.max()) >= self.config.codebook_size):
                raise ValueError(f"image token ids must lie in [0, {self.config.codebook_size})")
            return images
        if self.image_tokenizer is None:
            raise RuntimeError("this checkpoint has no image tokenizer; pass codebook ids [B, N]")
        arrays = self._pixels(images)
        if not arrays:
            return torch.zeros(0, self.config.image_tokens, dtype=torch.long)
        with torch.no_grad():  # one at a time, as decode_images: an image's ids do not depend on its batch
            return torch.cat([self.image_tokenizer.encode(torch.from_numpy(np.stack([a]))) for a in arrays])

    def understanding_embeddings(self, images):
        """(e_sem [B, sem_dim], e_id [B, id_dim]) float32 of the images, or (None, None) when the model has no
        embedder.

        From the pixels: images given as codebook ids are decoded by the image tokenizer first. One image at a
        time, so an image's embeddings (and so its answers) do not depend on the rest of the batch.
        """
        if self.embedder is None:
            return None, None
        pixels = self._pixels_or_decoded(images)
        if not pixels:
            return torch.zeros(0, self.config.sem_dim), torch.zeros(0, self.config.id_dim)
        rows = [self.embedder.understanding_embeddings(p[None]) for p in pixels]
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])

    def answer(self, images, questions, *, max_new_tokens: int | None = None, top_p: float | None = None,
               temperature: float = 1.0, seed: int = 0) -> list[str]:
        """Answer one question per image (greedy by default; nucleus sampling with ``top_p``). A model trained
        with understanding embeddings gets each image's ``e_sem``/``e_id``, computed once per request."""
        questions = check_strings("questions", questions)
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.long):
            images = self._pixels(images)  # read once: the tokens and the embeddings come from the same pixels
        image_ids = self.encode_images(images)
        if image_ids.shape[0] != len(questions):
            raise ValueError(f"got {image_ids.shape[0]} images but {len(questions)} questions")
        e_sem, e_id = self._embeddings_on_device(images)
        max_new = self.config.max_answer_len if max_new_tokens is None else max_new_tokens
        check_int("max_new_tokens", max_new, 1, MAX_NEW_TOKENS)
        check_bounded("temperature", temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)
        if top_p is not None:
            check_probability("top_p", top_p)
        ids = mmu_prompt_ids(image_ids, [self.encode_text(q) for q in questions], self.config)
        kwargs = dict(max_new_tokens=max_new, top_p=top_p, temperature=temperature,
                      seeds=self._seeds(seed, len(questions)), allowed_vocab=self.config.text_vocab_size,
                      e_sem=e_sem, e_id=e_id)
        answers = self.decoder.answer_ids(ids, **kwargs)
        return [self.decode_text(a) for a in answers]

    # ------------------------------------------------------------------------- one model, every direction
    def describe(self, images, *, mode: str = "diffusion", steps: int = 16, guidance: float = 0.0, seed: int = 0,
                 sample_temperature: float = 0.3, confidence_temperature: float = 0.0,
                 max_new_tokens: int | None = None) -> list[str]:
        """A caption per image.

        ``mode="diffusion"``: the caption block (``fastface.prompts``: a fixed-length block of text ids ended by
        <eos> and padding) starts fully masked and is decoded in parallel over ``steps`` by the masked-decoding op,
        as images are (``fastface.sampling.describe_ids``); ``guidance`` is classifier-free guidance against the
        same block after a fully masked image. ``mode="autoregressive"``: the understanding loop answers "what does
        this person look like?" one token at a time, greedily (``max_new_tokens``, default the block's length).
        """
        check_choice("mode", mode, ("diffusion", "autoregressive"))
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.long):
            images = self._pixels(images)
        if mode == "autoregressive":
            from fastface.data.text import CAPTION_QUESTION

            n = len(images)
            limit = text_block_length(self.config) - 1 if max_new_tokens is None else max_new_tokens
            return self.answer(images, [CAPTION_QUESTION] * n, max_new_tokens=limit) if n else []
        image_ids = self.encode_images(images)
        if image_ids.shape[0] == 0:
            return []
        e_sem, e_id = self._embeddings_on_device(images)
        blocks = self.decoder.describe_ids(image_ids, steps=steps, guidance=guidance,
                                           seeds=self._seeds(seed, image_ids.shape[0]),
                                           sample_temperature=sample_temperature,
                                           confidence_temperature=confidence_temperature, e_sem=e_sem, e_id=e_id)
        return [self.decode_text(block_text(b, self.config)) for b in blocks.tolist()]

    def generate_pair_tokens(self, n: int, *, steps: int = 16, guidance: float = 0.0, seed: int | list[int] = 0,
                             sample_temperature: float = 1.0, confidence_temperature: float = 4.5,
                             text_sample_temperature: float = 0.3, text_confidence_temperature: float = 0.0,
                             text: bool = True) -> tuple[list[str], torch.Tensor]:
        """``n`` (caption, image) pairs drawn together from the joint distribution -> (captions, codebook ids
        [n, N]). Caption block and image tokens start fully masked and are decoded in the same steps
        (``fastface.sampling.generate_pair_ids``). ``text=False``: unconditional images, the caption left masked
        (captions are then empty). ``guidance`` acts on the image, against a fully masked caption."""
        check_int("n", n, 0)
        if n == 0:
            return [], torch.zeros(0, self.config.image_tokens, dtype=torch.long)
        blocks, tokens = self.decoder.pair_ids(
            seeds=self._seeds(seed, n), steps=steps, guidance=guidance, sample_temperature=sample_temperature,
            confidence_temperature=confidence_temperature, text_sample_temperature=text_sample_temperature,
            text_confidence_temperature=text_confidence_temperature, decode_text=text)
        captions = [self.decode_text(block_text(b, self.config)) if text else "" for b in blocks.tolist()]
        return captions, tokens.cpu()

    def generate_pairs(self, n: int, **kwargs):
        """``n`` (caption, face) pairs drawn together -> (captions, PIL images); options as
        ``generate_pair_tokens``."""
        captions, tokens = self.generate_pair_tokens(n, **kwargs)
        return captions, self.decode_images(tokens)

    def edit_tokens(self, images, prompts, regions, *, steps: int = 16, guidance: float = 2.0,
                    seed: int | list[int] = 0, grow: int = 0, sample_temperature: float = 1.0,
                    confidence_temperature: float = 4.5) -> torch.Tensor:
        """Re-draw a region of each image under a new prompt -> codebook ids [B, N].

        Every token outside the region keeps its value, bit for bit; the tokens inside start masked and are decoded
        over ``steps`` (the schedule runs over the region's size) under the prompt, seeing the kept tokens (the
        image segment attends to itself). ``regions``: one per image, or one for all -- a name
        (``fastface.regions.REGIONS``: face, hair, eyes, mouth, background, ...; read from the perception model's
        parsing of the image), a bool pixel mask [S, S] (e.g. the face world's parsing), or a bool token mask [N] /
        [grid, grid]. ``grow`` widens each region by that many tokens.
        """
        from fastface.regions import resolve_region

        prompts = check_strings("prompts", prompts)
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.long):
            images = self._pixels(images)
        image_ids = self.encode_images(images)
        B = image_ids.shape[0]
        if B != len(prompts):
            raise ValueError(f"got {B} images but {len(prompts)} prompts")
        if isinstance(regions, (list, tuple)):
            if len(regions) != B:
                raise ValueError(f"got {len(regions)} regions for {B} images")
        else:
            regions = [regions] * B
        grid = self.config.image_grid
        parsing = None
        if any(isinstance(r, str) for r in regions):
            parsing = [f.parsing for f in self.perception.perceive(np.stack(self._pixels_or_decoded(images)))]
        masks = torch.stack([resolve_region(r, grid, parsing=None if parsing is None else parsing[b],
                                            classes=None if parsing is None else self.perception.parsing_classes,
                                            grow=grow) for b, r in enumerate(regions)])
        ids = t2i_prompt_ids([self.encode_text(p) for p in prompts], self.config)
        return self.decoder.image_tokens(ids, steps=steps, guidance=guidance, seeds=self._seeds(seed, B),
                                         sample_temperature=sample_temperature,
                                         confidence_temperature=confidence_temperature, tokens=image_ids,
                                         region=masks).cpu()

    def edit(self, image, prompt, region, **kwargs):
        """``edit_tokens`` for one image (a PIL image, a uint8 array [S, S, 3] or codebook ids [N]) -> a PIL image;
        lists of images and prompts -> a list of PIL images."""
        if isinstance(prompt, str):
            if isinstance(image, torch.Tensor) and image.dtype == torch.long and image.dim() == 1:
                image = image[None]
            elif not isinstance(image, torch.Tensor):
                image = [image]
            return self.decode_images(self.edit_tokens(image, [prompt], region, **kwargs))[0]
        return self.decode_images(self.edit_tokens(image, prompt, region, **kwargs))

    @property
    def perception(self):
        """The face perception model whose parsing names edit regions (the shipped face-s one, loaded on first
        use)."""
        if self._perception is None:
            from fastface.perception.perceptor import load_perception

            self._perception = load_perception()
            if self._perception.image_size != self.config.image_size:
                raise ValueError(f"the perception model reads {self._perception.image_size}-pixel faces, this "
                                 f"model draws {self.config.image_size}: name regions by a mask instead")
        return self._perception

    def _embeddings_on_device(self, images):
        e_sem, e_id = self.understanding_embeddings(images)
        device = self.model.embed.weight.device
        return (None if e is None else e.to(device) for e in (e_sem, e_id))

    def _pixels_or_decoded(self, images) -> list[np.ndarray]:
        if isinstance(images, torch.Tensor) and images.dtype == torch.long:
            return [np.asarray(p) for p in self.decode_images(images)]
        return self._pixels(images)

    def _pixels(self, images) -> list[np.ndarray]:
        """PIL images, uint8 arrays [B, S, S, 3] or a list of [S, S, 3] -> a list of uint8 [S, S, 3]."""
        if not isinstance(images, (list, tuple)):
            images = list(images) if isinstance(images, np.ndarray) and images.ndim == 4 else [images]
        size = self.config.image_size
        arrays = []
        for i, img in enumerate(images):
            if hasattr(img, "convert"):  # PIL: any mode, by fastface.images' rules (16-bit, alpha, palette, ...)
                img = np.asarray(to_rgb(img).resize((size, size)))
            img = np.asarray(img)
            if img.shape != (size, size, 3) or img.dtype != np.uint8:
                raise ValueError(f"images[{i}] must be a PIL image or uint8 array [{size}, {size}, 3], "
                                 f"got {img.dtype} {img.shape}")
            arrays.append(img)
        return arrays

    # ------------------------------------------------------------------------------------- face-text
    @property
    def facetext(self):
        """The face-text model: the checkpoint's embedder, else the shipped face-s one (loaded on first use)."""
        if self._facetext is None:
            from fastface.facetext.model import FaceTextModel

            self._facetext = FaceTextModel.load()
        return self._facetext

    def similarity(self, images, texts) -> torch.Tensor:
        """Face-text cosine similarity [I, T] (float32) of each image with each text (``fastface search`` ranks
        by it; ``fastface eval`` reports it for generated faces). Images as for ``answer`` (PIL, uint8 arrays,
        or codebook ids, which are decoded first)."""
        texts = check_strings("texts", texts)
        pixels = self._pixels_or_decoded(images)
        if not pixels:
            raise ValueError("images is empty")
        ft = self.facetext
        return ft.embed_images(np.stack(pixels)) @ ft.embed_texts(texts).T

    # ------------------------------------------------------------------------------------------ logits
    def logits(self, ids) -> torch.Tensor:
        """Float32 logits [B, L, V] of ids [B, L] in the checkpoint's own vocabulary (``config.vocab_size`` ids).

        A row with no image segment is plain causal language modelling (rotary positions 0..L-1, as transformers'
        ``*ForCausalLM``: for parity with the checkpoint's source); rows with an image segment run under the
        layout's attention (omni-attention: causal, with each image segment attending within itself; padding
        skipped), as ``<t2i>`` (generation group) when they start with it and as understanding otherwise. One
        full forward (the reference), no cache.
        """
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 2:
            raise TypeError(f"ids must be a LongTensor [B, L], got {type(ids).__name__} "
                            f"{getattr(ids, 'dtype', '')} {tuple(getattr(ids, 'shape', ()))}")
        c = self.config
        B, L = ids.shape
        if B == 0 or L == 0:
            raise ValueError(f"ids must hold at least one row and one position, got shape {(B, L)}")
        limit = c.max_text_len + c.image_tokens + 2 + MAX_NEW_TOKENS
        if L > limit:
            raise ValueError(f"ids has {L} positions; at most {limit} (max_text_len + image + answer)")
        if int(ids.min()) < 0 or int(ids.max()) >= c.vocab_size:
            raise ValueError(f"ids must lie in [0, {c.vocab_size}), got values in [{int(ids.min())}, {int(ids.max())}]")
        ids = ids.to(self.model.embed.weight.device)
        with torch.no_grad():
            segmented = (ids == c.soi_id).any(dim=1)
            out = torch.empty(B, L, c.vocab_size, dtype=torch.float32, device=ids.device)
            if bool((~segmented).any()):
                out[~segmented] = self.model.causal_logits(ids[~segmented]).float()
            if bool(segmented.any()):
                rows = ids[segmented]
                first = rows.gather(1, (rows != c.pad_id).int().argmax(dim=1, keepdim=True))[:, 0]
                task = (first == c.t2i_id).long()  # 1 = generation group, 0 = understanding
                out[segmented] = self.model(rows, task).logits.float()
        return out

    @staticmethod
    def _seeds(seed, n) -> list[int]:
        if isinstance(seed, (list, tuple)):
            if len(seed) != n:
                raise ValueError(f"got {len(seed)} seeds for {n} prompts")
            for s in seed:
                check_int("seed", s, 0)
            return [int(s) for s in seed]
        check_int("seed", seed, 0)
        return [seed + b for b in range(n)]


def load(path=None, *, backend: str = "auto", dtype: str = "float32", weights: str = "float") -> Pipeline:
    """Load a checkpoint directory (default: the embedded face model) into a ``Pipeline``.

    ``dtype="bfloat16"`` with ``backend="auto"`` on a CPU without bf16 matrix instructions loads the bf16 weights and
    runs them in float32 (``backends.math_dtype``: an exact upcast, and faster there), with a warning once.
    ``weights="int8"`` quantises the attention and expert weights to int8 after loading (opt-in, forward only:
    ``fastface.quantization``); activations and everything else run in ``dtype``.
    """
    backends.validate_choice(backend)
    check_choice("dtype", dtype, DTYPE_NAMES)
    check_choice("weights", weights, WEIGHT_FORMATS)
    runs_in = backends.math_dtype(dtype, backend)  # auto on a CPU without bf16 instructions: float32 math
    if runs_in == dtype:
        backends.warn_if_slow_bf16(dtype)
    if path is None:
        path = DEFAULT_MODEL
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the embedded default model is missing from this install ({path})")
    model, tokenizer, image_tokenizer, config = load_checkpoint(path, dtype=DTYPES[dtype])
    if runs_in != dtype:
        model = model.to(DTYPES[runs_in])  # the bf16 weights, upcast exactly
    if weights == "int8":
        quantize_int8(model)
    return Pipeline(model, tokenizer, image_tokenizer, backend=backend, embedder=load_embedder(path, config))
