"""Tokenizers a user gives to build a corpus datastore: a SentencePiece ``.model`` or a ``tokenizers`` JSON.

Both must produce the same ids the decoding model uses; the datastore manifest records the tokenizer's
kind, vocabulary size, the sha256 of its file and its **vocabulary fingerprint**
(:func:`vocab_fingerprint`), so a session naming another tokenizer is refused. Neither adds BOS/EOS: a
datastore stores text tokens only.

The vocabulary fingerprint is ``"vocab-sha256:" + sha256(json([[id, token], ...] sorted by id))`` over every
token of the vocabulary (added tokens included). It depends on the vocabulary only, not on the file that
holds it, so a SentencePiece ``.model``, the ``tokenizer.json`` converted from it and a Hugging Face
tokenizer loaded from either give the same string (``tests/drafting/test_tokenizer_fingerprint.py``), and
two tokenizers of the same size (LLaMA and Mistral, 32,000 each) give different ones.
:func:`tokenizer_fingerprint` computes it from a tokenizer object, a tokenizer file, or passes a
fingerprint string through.

Thread-safety: ``encode_batch`` may be called from several threads (both libraries are reentrant).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from retrieval.core.extras import need
from retrieval.errors import InvalidArgument, NotFound

logger = logging.getLogger(__name__)


FINGERPRINT_PREFIX = "vocab-sha256:"


def vocab_fingerprint(vocab) -> str:
    """The fingerprint of a vocabulary: ``vocab`` maps token -> id (a dict, as ``get_vocab()`` returns)
    or is a sequence of tokens in id order."""
    if isinstance(vocab, dict):
        pairs = sorted((int(i), str(t)) for t, i in vocab.items())
    else:
        pairs = [(i, str(t)) for i, t in enumerate(vocab)]
    if not pairs:
        raise InvalidArgument("the tokenizer's vocabulary is empty; nothing to fingerprint")
    blob = json.dumps(pairs, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return FINGERPRINT_PREFIX + hashlib.sha256(blob).hexdigest()


def is_fingerprint(s) -> bool:
    """True for a string of the form :func:`vocab_fingerprint` returns."""
    return (isinstance(s, str) and s.startswith(FINGERPRINT_PREFIX) and len(s) == len(FINGERPRINT_PREFIX) + 64
            and all(c in "0123456789abcdef" for c in s[len(FINGERPRINT_PREFIX):]))


MAX_FINGERPRINT_LEN = 256


def check_fingerprint(fp) -> str:
    """A fingerprint a request names: a non-empty string of at most 256 printable characters (any scheme;
    :func:`tokenizer_fingerprint` makes the canonical one). Raises :class:`InvalidArgument`."""
    if not isinstance(fp, str) or not 0 < len(fp) <= MAX_FINGERPRINT_LEN or not fp.isprintable():
        raise InvalidArgument(f"tokenizer_fingerprint={fp!r} must be 1-{MAX_FINGERPRINT_LEN} printable characters, "
                              "e.g. retrieval.drafting.tokenizer.tokenizer_fingerprint(tokenizer)")
    return fp


def tokenizer_fingerprint(tokenizer) -> str:
    """The vocabulary fingerprint of ``tokenizer``: a Hugging Face ``transformers`` tokenizer (its
    ``get_vocab()``), a ``tokenizers.Tokenizer``, a ``sentencepiece.SentencePieceProcessor``, a
    :class:`Tokenizer`, a path to a ``.model`` / ``.json`` tokenizer file, or a fingerprint string
    (returned as is). Raises :class:`InvalidArgument` for anything else."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer.vocab_fingerprint
    if isinstance(tokenizer, (str, Path)):
        if is_fingerprint(str(tokenizer)):
            return str(tokenizer)
        if Path(tokenizer).is_file():
            return Tokenizer(tokenizer).vocab_fingerprint
        raise InvalidArgument(f"tokenizer={str(tokenizer)!r} is neither a fingerprint ('{FINGERPRINT_PREFIX}' + 64 "
                              "hex digits) nor a tokenizer file")
    if hasattr(tokenizer, "get_piece_size") and hasattr(tokenizer, "id_to_piece"):  # sentencepiece
        return vocab_fingerprint([tokenizer.id_to_piece(i) for i in range(tokenizer.get_piece_size())])
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        try:
            vocab = get_vocab(with_added_tokens=True)  # tokenizers.Tokenizer
        except TypeError:
            vocab = get_vocab()  # transformers: added tokens included
        return vocab_fingerprint(vocab)
    raise InvalidArgument(f"tokenizer of type {type(tokenizer).__name__} has no vocabulary to fingerprint; pass a "
                          "Hugging Face / tokenizers / sentencepiece tokenizer, a tokenizer file or a fingerprint")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """A loaded tokenizer. ``kind``: ``"sentencepiece"`` or ``"tokenizers"``; ``vocab_size``; ``fingerprint``
    (sha256 of the file); ``vocab_fingerprint`` (:func:`vocab_fingerprint`, what sessions name)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise NotFound(f"tokenizer file {str(path)!r} does not exist")
        self.path = path
        self.fingerprint = file_sha256(path)
        suffix = path.suffix.lower()
        if suffix == ".model":
            spm = need("sentencepiece", "drafts", "reading a SentencePiece (.model) tokenizer")
            try:
                self._sp = spm.SentencePieceProcessor(model_file=str(path))
            except Exception as e:
                raise InvalidArgument(f"tokenizer {str(path)!r} is not a SentencePiece model: {e}") from e
            self.kind = "sentencepiece"
            self.vocab_size = int(self._sp.get_piece_size())
            self.vocab_fingerprint = vocab_fingerprint([self._sp.id_to_piece(i) for i in range(self.vocab_size)])
        elif suffix == ".json":
            tokenizers = need("tokenizers", "drafts", "reading a tokenizer JSON")
            try:
                self._tk = tokenizers.Tokenizer.from_file(str(path))
            except Exception as e:
                raise InvalidArgument(f"tokenizer {str(path)!r} is not a `tokenizers` JSON: {e}") from e
            self.kind = "tokenizers"
            self.vocab_size = int(self._tk.get_vocab_size(with_added_tokens=True))
            self.vocab_fingerprint = vocab_fingerprint(self._tk.get_vocab(with_added_tokens=True))
        else:
            raise InvalidArgument(f"tokenizer {str(path)!r}: expected a SentencePiece '.model' or a "
                                  f"`tokenizers` '.json' file, got suffix {suffix!r}")

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, no special tokens added."""
        if self.kind == "sentencepiece":
            return self._sp.encode(list(texts))
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "fingerprint": self.fingerprint,
                "vocab_fingerprint": self.vocab_fingerprint, "file": self.path.name}
