"""Tokenizers a user gives to build a corpus datastore: a SentencePiece ``.model`` or a ``tokenizers`` JSON.

Both must produce the same ids the decoding model uses; the datastore manifest records the tokenizer's
kind, vocabulary size and a fingerprint (sha256 of the file) so a session can refuse a datastore made
with another tokenizer. Neither adds BOS/EOS: a datastore stores text tokens only.

Thread-safety: ``encode_batch`` may be called from several threads (both libraries are reentrant).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from retrieval.errors import FailedPrecondition, InvalidArgument, NotFound

logger = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tokenizer:
    """A loaded tokenizer. ``kind``: ``"sentencepiece"`` or ``"tokenizers"``; ``vocab_size``; ``fingerprint``."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise NotFound(f"tokenizer file {str(path)!r} does not exist")
        self.path = path
        self.fingerprint = file_sha256(path)
        suffix = path.suffix.lower()
        if suffix == ".model":
            try:
                import sentencepiece as spm
            except ImportError as e:  # pragma: no cover - depends on the install
                raise FailedPrecondition("the 'sentencepiece' package is needed to read a .model tokenizer") from e
            try:
                self._sp = spm.SentencePieceProcessor(model_file=str(path))
            except Exception as e:
                raise InvalidArgument(f"tokenizer {str(path)!r} is not a SentencePiece model: {e}") from e
            self.kind = "sentencepiece"
            self.vocab_size = int(self._sp.get_piece_size())
        elif suffix == ".json":
            try:
                import tokenizers
            except ImportError as e:  # pragma: no cover
                raise FailedPrecondition("the 'tokenizers' package is needed to read a tokenizer JSON") from e
            try:
                self._tk = tokenizers.Tokenizer.from_file(str(path))
            except Exception as e:
                raise InvalidArgument(f"tokenizer {str(path)!r} is not a `tokenizers` JSON: {e}") from e
            self.kind = "tokenizers"
            self.vocab_size = int(self._tk.get_vocab_size(with_added_tokens=True))
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
                "file": self.path.name}
