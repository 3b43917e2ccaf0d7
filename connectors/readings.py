"""Decoding sensor readings: one message = one timestep of one stream's channels. Shared by the MQTT,
serial and CSV sources.

The payload decides the form:

- a ``dict`` (a CSV row, column name → text): the channels are columns, the timestamp is column
  ``timestamp_column``; other columns are ignored. A key ``None`` holds fields beyond the header (a list,
  as ``csv.DictReader`` puts them) or, as text, why the source could not read the row.
- ``bytes``/``str`` whose first non-blank character is ``{``: a JSON object, ``{"ts": 1700000000,
  "value": 3.2}`` (one channel only) or ``{"ts": ..., "values": {"temp": 3.2, "rpm": 1200}}``, with an
  optional ``"id"`` or ``"stream"`` naming the stream when the message has no key.
- other ``bytes``/``str``: one line ``timestamp,value[,value...]``, values in channel order; an empty
  timestamp field means no timestamp.

Timestamps are seconds since the Unix epoch: a number, a numeric string, or an ISO-8601 text such as
``2014-04-01 00:00:00`` (naive means UTC). Absent (or empty, or JSON ``null``) → ``Decoded.ts = None``.

Anything that cannot become a reading raises ``DecodeError`` with a one-line reason and a ``kind``:
``malformed``, ``oversized``, ``missing_stream``, ``bad_timestamp``, ``missing_value``, ``non_numeric``,
``out_of_range``, ``unknown_channel``, ``missing_channel``. ``decode`` raises nothing else.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from connectors.base import Message
from connectors.codec import Decoded, DecodeError, refusing

MIN_TS = -62_135_596_800.0  # 0001-01-01T00:00:00Z
MAX_TS = 253_402_300_799.0  # 9999-12-31T23:59:59Z
JSON_KEYS = frozenset({"ts", "value", "values", "id", "stream"})

_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)
_ISO = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(?:[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,9})?)?)?"
    r"(?:Z|[+-][0-9]{2}(?::?[0-9]{2})?)?"
)
_BLANK = " \t\r\n\ufeff"


def _show(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters, for reasons."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_timestamp(value: Any) -> float | None:
    """``value`` as seconds since the Unix epoch (``float``), or ``None`` when absent (``None`` or blank
    text). Takes a number, a numeric string or an ISO-8601 text (naive = UTC); raises ``DecodeError``
    (kind ``bad_timestamp``) for anything else, a non-finite number, or a time outside years 1-9999."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise DecodeError(f"timestamp must be a number or a date text, got {_show(value)}", "bad_timestamp")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        ts = _text_timestamp(text)
    else:
        try:
            ts = float(value)
        except OverflowError:
            ts = math.inf
    if not MIN_TS <= ts <= MAX_TS:  # also NaN
        raise DecodeError(f"timestamp {_show(value)} is not a time between years 1 and 9999", "bad_timestamp")
    return ts


@functools.lru_cache(maxsize=4096)  # rows of many streams share their timestamps
def _text_timestamp(text: str) -> float:
    if _NUMBER.fullmatch(text):
        return float(text)
    if _ISO.fullmatch(text):
        try:
            when = datetime.fromisoformat(text)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return when.timestamp()
        except (ValueError, OverflowError, OSError):
            pass
    raise DecodeError(f"timestamp {_show(text)} is neither seconds nor an ISO-8601 time", "bad_timestamp")


def _stream_text(value: Any, where: str) -> str:
    """A stream id as text: a non-empty, UTF-8-encodable string (or an int, from JSON)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63:
        return str(value)
    if not isinstance(value, str) or not value:
        raise DecodeError(f"{where} must be a non-empty text, got {_show(value)}", "missing_stream")
    try:
        value.encode()
    except UnicodeEncodeError as exc:
        raise DecodeError(f"{where} is not valid UTF-8 text", "malformed") from exc
    return value


def _parse_int(text: str) -> int | float:
    """The stdlib JSON parser's integers: huge ones as floats (``inf`` beyond the double range) instead
    of a ``ValueError`` on more than 4300 digits."""
    return int(text) if len(text) < 20 else float(text)


def _parse_json(text: str) -> dict[str, Any]:
    """A JSON object; ``DecodeError`` (``malformed``) for invalid JSON or another type. NaN/Infinity
    literals and numbers beyond the double range, which orjson refuses, are read by the standard library
    so that they are reported as out of range."""
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        try:
            doc = json.loads(text, parse_int=_parse_int)
        except (ValueError, RecursionError, OverflowError):
            raise DecodeError(f"not valid JSON: {exc}", "malformed") from None
    if type(doc) is not dict:
        raise DecodeError(f"JSON reading must be an object, got {type(doc).__name__}", "malformed")
    return doc


@dataclass(frozen=True)
class ReadingDecoder:
    """Decodes readings of ``channels`` (feature order of the model) into one-timestep ``Decoded``
    events: ``xs = [[v1, ..., vF]]`` floats, ``F = len(channels)``; ``ts`` seconds or ``None``.

    - ``max_abs_value``: a value whose magnitude exceeds it is out of range (so are NaN and Inf).
    - ``max_bytes``: a larger payload is refused unread (``oversized``).
    - ``extra_channels``: ``"reject"`` a JSON channel or line field beyond ``channels``
      (``unknown_channel``), or ``"ignore"`` it.
    - ``timestamp_column`` / ``stream_column``: the CSV row's columns holding the time and (when messages
      carry no key) the stream id.
    """

    channels: list[str] = field(default_factory=lambda: ["value"])
    max_abs_value: float = 1e15
    max_bytes: int = 65_536
    extra_channels: Literal["reject", "ignore"] = "reject"
    timestamp_column: str = "timestamp"
    stream_column: str | None = None
    _known: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        channels = list(self.channels)
        if not channels or not all(isinstance(c, str) and c for c in channels):
            raise ValueError(f"channels must be a non-empty list of names, got {self.channels!r}")
        if len(set(channels)) != len(channels):
            raise ValueError(f"channels must be distinct, got {channels!r}")
        if self.extra_channels not in ("reject", "ignore"):
            raise ValueError(f"extra_channels must be 'reject' or 'ignore', got {self.extra_channels!r}")
        if not self.max_abs_value > 0 or self.max_bytes <= 0:
            raise ValueError("max_abs_value and max_bytes must be positive")
        object.__setattr__(self, "channels", channels)
        object.__setattr__(self, "_known", frozenset(channels))

    # ---- entry point ---------------------------------------------------------------------------------
    @refusing
    def decode(self, message: Message) -> Decoded:
        """``message`` (payload: a row ``dict``, JSON or a line as ``bytes``/``str``) as one reading;
        raises ``DecodeError`` only."""
        try:
            return self._decode(message)
        except DecodeError:
            raise
        except Exception as exc:  # a bug here must still read as a dead letter with this decoder's kind
            raise DecodeError(
                f"undecodable reading ({type(exc).__name__}: {exc})"[:500], "malformed"
            ) from exc

    def _decode(self, message: Message) -> Decoded:
        payload = message.payload
        key = _key_text(message.key)
        if isinstance(payload, dict):
            return self._row(payload, key)
        text = payload_text(payload, self.max_bytes)
        if text.lstrip(_BLANK)[:1] == "{":
            return self._json(text, key)
        return self._line(text, key)

    # ---- the three forms -----------------------------------------------------------------------------
    def _json(self, text: str, key: str | None) -> Decoded:
        doc = _parse_json(text)
        unknown = [k for k in doc if k not in JSON_KEYS]
        if unknown:
            raise DecodeError(f"unknown keys {_show(sorted(unknown), 80)}; expected {sorted(JSON_KEYS)}")
        sid = key if key is not None else self._json_stream(doc)
        ts = parse_timestamp(doc.get("ts"))
        if "value" in doc and "values" in doc:
            raise DecodeError("give 'value' or 'values', not both")
        if "value" in doc:
            if len(self.channels) != 1:
                raise DecodeError(f"'value' needs exactly one channel; use 'values' for {self.channels}")
            return Decoded([[self._number(doc["value"], self.channels[0])]], ts=ts, stream_id=sid)
        if "values" not in doc:
            raise DecodeError("no 'value' or 'values' in the reading", "missing_value")
        return Decoded([self._values(doc["values"])], ts=ts, stream_id=sid)

    def _json_stream(self, doc: dict[str, Any]) -> str:
        ids = [doc[k] for k in ("id", "stream") if k in doc]
        if not ids:
            raise DecodeError("no stream: the message has no key and the reading no 'id'", "missing_stream")
        sid = _stream_text(ids[0], "'id'/'stream'")
        if len(ids) == 2 and _stream_text(ids[1], "'stream'") != sid:
            raise DecodeError(f"'id' {_show(ids[0])} and 'stream' {_show(ids[1])} disagree")
        return sid

    def _values(self, values: Any) -> list[float]:
        """A JSON ``values`` object as floats in channel order."""
        if type(values) is not dict:
            raise DecodeError(f"'values' must be an object of channel → number, got {type(values).__name__}")
        if self.extra_channels == "reject":
            unknown = [c for c in values if c not in self._known]
            if unknown:
                raise DecodeError(
                    f"unknown channels {_show(sorted(unknown), 80)}; expected {self.channels}",
                    "unknown_channel",
                )
        missing = [c for c in self.channels if c not in values]
        if missing:
            raise DecodeError(f"missing channels {missing}", "missing_channel")
        return [self._number(values[c], c) for c in self.channels]

    def _line(self, text: str, key: str | None) -> Decoded:
        """``timestamp,value[,value...]``."""
        line = text.strip(_BLANK)
        if not line:
            raise DecodeError("empty line")
        if "\n" in line or "\r" in line:
            raise DecodeError("more than one line in one message")
        if key is None:
            raise DecodeError(
                "no stream: a line carries no stream id and the message has no key", "missing_stream"
            )
        fields = line.split(",")
        ts = parse_timestamp(fields[0])
        values = fields[1:]
        n = len(self.channels)
        if len(values) < n:
            raise DecodeError(f"{len(values)} value(s) for channels {self.channels}", "missing_value")
        if len(values) > n and self.extra_channels == "reject":
            raise DecodeError(f"{len(values)} values for {n} channel(s) {self.channels}", "unknown_channel")
        xs = [self._number(v, c) for v, c in zip(values, self.channels, strict=False)]
        return Decoded([xs], ts=ts, stream_id=key)

    def _row(self, row: dict[Any, Any], key: str | None) -> Decoded:
        """A CSV row: column → text."""
        if None in row:
            extra = row[None]
            if isinstance(extra, str):
                raise DecodeError(f"unreadable row ({extra})"[:500])
            count = len(extra) if isinstance(extra, list | tuple) else 1
            raise DecodeError(f"row has {count} field(s) more than the header")
        size = sum(len(v) for v in row.values() if isinstance(v, str))
        if size > self.max_bytes:
            raise DecodeError(f"oversized: row of {size} characters > max {self.max_bytes}", "oversized")
        sid = key if key is not None else self._row_stream(row)
        ts = parse_timestamp(row.get(self.timestamp_column))
        missing = [c for c in self.channels if c not in row]
        if missing:
            raise DecodeError(f"row lacks column(s) {missing}", "missing_value")
        return Decoded([[self._number(row[c], c) for c in self.channels]], ts=ts, stream_id=sid)

    def _row_stream(self, row: dict[Any, Any]) -> str:
        if self.stream_column is None:
            raise DecodeError(
                "no stream: the message has no key and no stream_column is set", "missing_stream"
            )
        value = row.get(self.stream_column)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DecodeError(
                f"no stream: column {self.stream_column!r} is empty or absent", "missing_stream"
            )
        return _stream_text(
            value.strip() if isinstance(value, str) else value, f"column {self.stream_column!r}"
        )

    # ---- values --------------------------------------------------------------------------------------
    def _number(self, value: Any, channel: str) -> float:
        """One channel's value as a finite float within ``max_abs_value``."""
        if value is None:
            raise DecodeError(f"channel {channel!r}: missing value (null)", "missing_value")
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise DecodeError(f"channel {channel!r}: not a number: {_show(value)}", "non_numeric")
        if isinstance(value, str):
            x = self._text_number(value, channel)
        else:
            try:
                x = float(value)
            except OverflowError:
                x = math.inf
        if not abs(x) <= self.max_abs_value:  # also NaN
            raise DecodeError(
                f"channel {channel!r}: {_show(value)} is NaN, infinite or beyond ±{self.max_abs_value:g}",
                "out_of_range",
            )
        return x

    def _text_number(self, value: str, channel: str) -> float:
        text = value.strip()
        if not text:
            raise DecodeError(f"channel {channel!r}: missing value (empty)", "missing_value")
        if _NUMBER.fullmatch(text):
            return float(text)  # may be inf ("1e999"): out of range
        if _NON_FINITE.fullmatch(text):
            return math.nan
        raise DecodeError(f"channel {channel!r}: not a number: {_show(value)}", "non_numeric")


def payload_text(payload: Any, max_bytes: int) -> str:
    """A ``bytes``/``str`` payload as text, at most ``max_bytes`` bytes of UTF-8."""
    if isinstance(payload, bytearray | memoryview):
        payload = bytes(payload)
    if isinstance(payload, bytes):
        if len(payload) > max_bytes:
            raise DecodeError(f"oversized: {len(payload)} bytes > max {max_bytes}", "oversized")
        try:
            return payload.decode()
        except UnicodeDecodeError as exc:
            raise DecodeError(f"payload is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if isinstance(payload, str):
        if len(payload) > max_bytes:
            raise DecodeError(f"oversized: {len(payload)} characters > max {max_bytes}", "oversized")
        try:
            size = len(payload.encode())
        except UnicodeEncodeError:
            raise DecodeError("payload is not valid UTF-8 text (lone surrogate)") from None
        if size > max_bytes:
            raise DecodeError(f"oversized: {size} bytes > max {max_bytes}", "oversized")
        return payload
    if payload is None:
        raise DecodeError("empty payload")
    raise DecodeError(f"payload must be bytes, text or a row, got {type(payload).__name__}")


def _key_text(key: Any) -> str | None:
    """A message key as a stream id; ``None`` when absent."""
    if key is None:
        return None
    if isinstance(key, bytes | bytearray):
        try:
            key = bytes(key).decode()
        except UnicodeDecodeError:
            raise DecodeError("message key is not UTF-8") from None
    if not isinstance(key, str):
        raise DecodeError(f"message key must be bytes or text, got {type(key).__name__}")
    return _stream_text(key, "message key")
