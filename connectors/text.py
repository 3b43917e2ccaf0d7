"""Text messages as token-id events: the tokenizer a text model ships in its bundle, and the decoder that
turns one message's text into ``T`` events (one token id each) of its stream, in order.

A message is a CSV row (``dict``: column → text, as ``connectors.csv`` gives it) or a JSON object
(``bytes``/``str``)::

    {"text": "great phone, awful battery", "control": "end", "user": "u42", "ts": 1700000000}

- ``text``: the words; tokenized by the model's ``Tokenizer`` (``ModelInfo.features["tokenizer"]``).
- ``control``: optional ``start``/``reset`` (before the message's tokens) or ``end`` (after them: the
  stream's answer, a many-to-one model's label, goes out and its state is freed). A message may carry
  only a control.
- the stream: the message key (Kafka, MQTT), else the ``stream_key`` field (``user``) / CSV column.

Whatever the bytes, JSON or unicode, a message decodes or is refused with a ``DecodeError`` naming why
(a dead letter); nothing else is touched.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from connectors.base import Message
from connectors.codec import CONTROLS, Decoded, DecodeError, _finite, refusing
from connectors.readings import _key_text, _parse_json, _show, _stream_text, payload_text

TOKEN = re.compile(r"\w+|[^\w\s]")
"""A token: a run of word characters (any script's letters, digits, ``_``) or one other character
(punctuation, an emoji); control and format characters (Unicode category C) are dropped."""
UNKNOWN = "<unk>"


@dataclass(frozen=True)
class Tokenizer:
    """Text → token ids: NFKC-normalised, lowercased (``lowercase``), cut into ``TOKEN``\\ s; a token is
    its index in ``vocabulary``, or ``unknown_id`` when absent. A text of more than ``max_tokens`` tokens
    is refused (``oversized``), never cut silently."""

    vocabulary: tuple[str, ...]
    lowercase: bool = True
    unknown_id: int = 0
    max_tokens: int = 512
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        vocabulary = tuple(self.vocabulary)
        if not vocabulary or not all(isinstance(t, str) and t for t in vocabulary):
            raise ValueError("tokenizer vocabulary must be a non-empty list of non-empty strings")
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("tokenizer vocabulary has duplicate tokens")
        if not 0 <= self.unknown_id < len(vocabulary) or self.max_tokens < 1:
            raise ValueError("tokenizer unknown_id must index the vocabulary; max_tokens must be >= 1")
        object.__setattr__(self, "vocabulary", vocabulary)
        object.__setattr__(self, "_ids", {t: i for i, t in enumerate(vocabulary)})

    @property
    def size(self) -> int:
        """Token ids are in ``[0, size)``: the embedding's ``num_embeddings`` must be at least this."""
        return len(self.vocabulary)

    def tokens(self, text: str) -> list[str]:
        """``text``'s tokens as strings, at most ``max_tokens`` (more: ``DecodeError`` ``oversized``)."""
        text = unicodedata.normalize("NFKC", text)
        if self.lowercase:
            text = text.lower()
        out: list[str] = []
        for match in TOKEN.finditer(text):
            token = match.group()
            if len(token) == 1 and unicodedata.category(token)[0] == "C":
                continue  # control and format characters, unpaired surrogates: no tokens
            if len(out) == self.max_tokens:
                raise DecodeError(
                    f"oversized: more than {self.max_tokens} tokens in one message", "oversized"
                )
            out.append(token)
        return out

    def encode(self, text: str) -> list[int]:
        """``text`` as token ids, ``(T,)`` ints in ``[0, size)``, ``T <= max_tokens``."""
        ids, unknown = self._ids, self.unknown_id
        return [ids.get(t, unknown) for t in self.tokens(text)]

    def to_features(self) -> dict[str, Any]:
        """What a bundle stores in ``ModelInfo.features["tokenizer"]`` (JSON)."""
        return {
            "vocabulary": list(self.vocabulary),
            "lowercase": self.lowercase,
            "unknown_id": self.unknown_id,
            "max_tokens": self.max_tokens,
        }

    @classmethod
    def from_features(cls, features: dict[str, Any]) -> Tokenizer:
        """The tokenizer of a bundle's ``ModelInfo.features``; ``ValueError`` when it has none."""
        spec = features.get("tokenizer")
        if not isinstance(spec, dict) or "vocabulary" not in spec:
            raise ValueError("the model ships no tokenizer (ModelInfo.features['tokenizer'])")
        return cls(
            tuple(spec["vocabulary"]),
            bool(spec.get("lowercase", True)),
            int(spec.get("unknown_id", 0)),
            int(spec.get("max_tokens", 512)),
        )

    @classmethod
    def fit(
        cls, texts: Iterable[str], min_count: int = 2, lowercase: bool = True, max_tokens: int = 512
    ) -> Tokenizer:
        """A vocabulary of the tokens seen at least ``min_count`` times in ``texts`` (most frequent
        first, ties alphabetical), after ``UNKNOWN`` at id 0."""
        probe = cls((UNKNOWN,), lowercase, 0, 1 << 30)
        counts = Counter(t for text in texts for t in probe.tokens(text))
        kept = sorted(
            (t for t, n in counts.items() if n >= min_count and t != UNKNOWN), key=lambda t: (-counts[t], t)
        )
        return cls((UNKNOWN, *kept), lowercase, 0, max_tokens)


@dataclass(frozen=True)
class TextDecoder:
    """Decodes text messages into ``Decoded`` events: ``xs`` the token ids ``(T,)``, ``control``, ``ts``
    (JSON only), ``label`` (JSON only), ``stream_id``.

    - ``text_key`` / ``control_key``: the JSON keys or CSV columns of the text and the control (a blank
      CSV cell: no control).
    - ``stream_key``: the JSON key or CSV column naming the stream when the message has no key.
    - ``max_bytes``: a larger payload (or text) is refused unread (``oversized``).
    """

    tokenizer: Tokenizer
    text_key: str = "text"
    control_key: str = "control"
    stream_key: str = "user"
    max_bytes: int = 65_536

    @refusing
    def decode(self, message: Message) -> Decoded:
        """``message`` (payload: a CSV row ``dict``, or a JSON object as ``bytes``/``str``) as events."""
        payload = message.payload
        key = _key_text(message.key)
        if isinstance(payload, dict):
            return self._row(payload, key)
        doc = _parse_json(payload_text(payload, self.max_bytes))
        known = (self.text_key, self.control_key, self.stream_key, "ts", "label")
        unknown = [k for k in doc if k not in known]
        if unknown:
            raise DecodeError(f"unknown keys {_show(sorted(unknown), 80)}; expected {sorted(known)}")
        ts = doc.get("ts")
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float) or not _finite(ts)):
            raise DecodeError(f"ts must be a finite number of seconds, got {_show(ts)}", "bad_timestamp")
        sid = key if key is not None else self._stream(doc.get(self.stream_key))
        control = self._control(doc.get(self.control_key))
        xs = self._tokens(doc.get(self.text_key), control)
        return Decoded(xs, control, doc.get("label"), ts, sid)

    def _row(self, row: dict[Any, Any], key: str | None) -> Decoded:
        """A CSV row: column → text."""
        if None in row:
            extra = row[None]
            reason = extra if isinstance(extra, str) else "row has more fields than the header"
            raise DecodeError(f"unreadable row ({reason})"[:500])
        size = sum(len(v) for v in row.values() if isinstance(v, str))
        if size > self.max_bytes:
            raise DecodeError(f"oversized: row of {size} characters > max {self.max_bytes}", "oversized")
        sid = key if key is not None else self._stream(row.get(self.stream_key))
        cell = row.get(self.control_key)
        control = self._control((cell.strip() if isinstance(cell, str) else cell) or None)
        return Decoded(self._tokens(row.get(self.text_key) or None, control), control, stream_id=sid)

    def _stream(self, value: Any) -> str:
        if value is None:
            raise DecodeError(
                f"no stream: the message has no key and no {self.stream_key!r}", "missing_stream"
            )
        return _stream_text(value, repr(self.stream_key))

    @staticmethod
    def _control(value: Any) -> str | None:
        if value is not None and value not in CONTROLS:
            raise DecodeError(f"unknown control {_show(value)}; expected one of {CONTROLS}")
        return value

    def _tokens(self, text: Any, control: str | None) -> list[int]:
        """The text's token ids; a message without tokens must carry a control."""
        if text is None:
            if control is None:
                raise DecodeError(f"missing {self.text_key!r} (and no control)", "missing_value")
            return []
        if not isinstance(text, str):
            raise DecodeError(f"{self.text_key!r} must be a string, got {type(text).__name__}", "non_text")
        ids = self.tokenizer.encode(text)
        if not ids and control is None:
            raise DecodeError(f"{self.text_key!r} has no tokens (and no control)", "missing_value")
        return ids
