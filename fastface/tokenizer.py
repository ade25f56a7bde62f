"""Text tokenizer: a word-level HF ``tokenizers`` model over the face-world vocabulary.

    tok = build_text_tokenizer(vocabulary(), vocab_size=384)   # specials at ids 0..7, then the words
    tok.save("tokenizer.json"); tok = load_text_tokenizer("tokenizer.json")
    ids = encode_text(tok, "a smiling woman with red hair")   # list[int]; unknown words -> <unk> (id 7)
    decode_text(tok, ids)                                       # "a smiling woman with red hair"

Text is lower-cased, split on whitespace and then on every punctuation mark (a hyphen between letters stays
inside its word: "middle-aged" is one token), matching ``fastface.data.text.split_words``. Decoding joins
words with spaces and re-attaches punctuation.

Text never produces a special token: ``"<eos>"`` inside a question is the characters ``<``, ``eos``, ``>`` (each
``<unk>``), not the end of the question. Control tokens are placed by the sequence builders
(``fastface.prompts``), as ids. Every tokenizer this module builds or loads is set that way
(``text_only``), and so is a ``Pipeline``'s.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordLevel

from fastface.config import SPECIAL_TOKENS, UNK_ID

UNK = SPECIAL_TOKENS[UNK_ID]


def build_text_tokenizer(words, vocab_size: int | None = None) -> Tokenizer:
    """A WordLevel tokenizer: ``SPECIAL_TOKENS`` at ids 0..7, then ``words`` in the given order.

    ``vocab_size`` pads the vocabulary with ``<unused0>``, ``<unused1>``, … up to exactly that many tokens (the
    model's ``text_vocab_size``), so a checkpoint can grow its vocabulary later without changing its shape.
    """
    words = [str(w).lower() for w in words]
    seen, ordered = set(SPECIAL_TOKENS), []
    for w in words:
        if not w or any(ch.isspace() for ch in w):
            raise ValueError(f"vocabulary entry {w!r} must be one non-empty word without spaces")
        if w not in seen:
            seen.add(w)
            ordered.append(w)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in ordered:
        vocab[w] = len(vocab)
    if vocab_size is not None:
        if len(vocab) > vocab_size:
            raise ValueError(f"{len(vocab)} tokens ({len(SPECIAL_TOKENS)} specials + {len(ordered)} words) do not fit "
                             f"vocab_size={vocab_size}")
        k = 0
        while len(vocab) < vocab_size:
            vocab[f"<unused{k}>"] = len(vocab)
            k += 1
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # whitespace, then every punctuation mark on its own; a hyphen inside a word keeps it whole ("middle-aged")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"[^\w\s-]|(?<!\w)-|-(?!\w)"), behavior="isolated"),
    ])
    # WordPiece's decoder joins with spaces and removes the space before , . ? ! (no word starts with "##")
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return text_only(tok)


def text_only(tok: Tokenizer) -> Tokenizer:
    """Set ``tok`` to read special-token text as plain text (``encode_special_tokens``) and return it. The
    setting is not stored in tokenizer.json, so every loader applies it."""
    if not isinstance(tok, Tokenizer):
        raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tok).__name__}")
    tok.encode_special_tokens = True
    return tok


def default_text_tokenizer(vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer over ``fastface.data.text.vocabulary()`` (padded to ``vocab_size`` when given)."""
    from fastface.data.text import vocabulary

    return build_text_tokenizer(vocabulary(), vocab_size)


def load_text_tokenizer(path) -> Tokenizer:
    """Read a ``tokenizer.json`` (a file, or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer file")
    return text_only(Tokenizer.from_file(str(path)))


def encode_text(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` (no special tokens added, none read from the text); unknown words become
    ``<unk>``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    return tok.encode(text, add_special_tokens=False).ids


def decode_text(tok: Tokenizer, ids) -> str:
    """Text of ``ids``, skipping special tokens (``<unk>`` included) and padding."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=True)


__all__ = ["build_text_tokenizer", "default_text_tokenizer", "load_text_tokenizer", "text_only", "encode_text",
           "decode_text"]
