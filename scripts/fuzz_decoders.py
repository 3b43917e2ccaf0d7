"""Coverage-guided fuzzing (atheris, libFuzzer) of every message decoder: the Kafka payload decoders
(``connectors.codec``: JSON, msgpack, float32 frames, categorical ids, keyed messages, feedback records),
the sensor readings (``connectors.readings``: JSON, lines, CSV rows; through the serial line's
``FlaggedLineDecoder`` too) and the audio segments (``connectors.audio.AudioDecoder``).

The contract checked on every input: a decoder returns an event the engine can take, or raises
``DecodeError`` with a reason; any other exception, or a returned event the engine would refuse (wrong
shape, NaN, out of range, too many timesteps, an unknown control), is a crash that libFuzzer reports with
the input. Refusals by the ``refusing`` safety net (kind ``undecodable``: an exception the decoder did not
anticipate itself) are allowed by the contract but counted, with an example each, in the summary.

    python scripts/fuzz_decoders.py [--summary PATH] [--break] CORPUS_DIR [libFuzzer flags: -runs=N ...]

``CORPUS_DIR`` is seeded with valid messages of each target when empty. ``--summary`` writes, every 500
inputs, ``{"inputs", "targets": {name: {"decoded", "refused", "undecodable", "examples"}}}`` as JSON.
``--break`` removes the payload decoder's check of float32 frames (the harness's own check: it must
report the NaN frames or the oversized messages that then get through).

The first input byte picks the target; the rest is its payload (or what ``FuzzedDataProvider`` builds a
CSV row or an audio segment from).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris
import msgpack  # imported before instrumentation: only the connectors are instrumented
import numpy as np
import orjson  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["connectors"]):
    from connectors.audio import AudioDecoder, BadAudio, Segment
    from connectors.base import Message
    from connectors.codec import (
        CONTROLS,
        FLOAT32_MAX,
        Decoded,
        DecodeError,
        Decoder,
        KeyedDecoder,
        decode_feedback,
    )
    from connectors.readings import ReadingDecoder
    from connectors.serial import FlaggedLineDecoder
    from connectors.text import UNKNOWN, TextDecoder, Tokenizer

FEATURES = 3
MAX_STEPS = 64
EMBEDDINGS = 10
N_MFCC = 13
ROW_KEYS = ["timestamp", "temp", "rpm", "machine", "other", None]
TEXT_WORDS = ["great", "phone", "awful", "!", "日本"]


class _FlaggingSource:
    """What ``FlaggedLineDecoder`` asks of a serial source: its port and the flag of a line (pure logic)."""

    port = "/dev/ttyFUZZ"

    def __init__(self) -> None:
        self.problem: str | None = None

    def line_problem(self, position: int) -> str | None:
        return self.problem


# ---- checks of a decoded event -------------------------------------------------------------------------
def check_features(decoded: Decoded, width: int, max_steps: int, max_abs: float = FLOAT32_MAX) -> None:
    """``xs`` is ``(T, width)`` finite floats within ``max_abs``, ``T <= max_steps`` (``T = 0`` is a message
    the pipeline steps nothing for); the control is a known one."""
    assert decoded.control is None or decoded.control in CONTROLS, decoded.control
    xs = np.asarray(decoded.xs, dtype=np.float64)
    if xs.size == 0:
        return
    assert xs.ndim == 2 and xs.shape[1] == width and len(xs) <= max_steps, xs.shape
    assert np.isfinite(xs).all() and (np.abs(xs) <= max_abs).all(), xs
    assert isinstance(decoded.stream_id, str)


def check_ids(decoded: Decoded) -> None:
    assert decoded.control is None or decoded.control in CONTROLS, decoded.control
    xs = np.asarray(decoded.xs)
    if xs.size == 0:
        return
    assert xs.ndim == 1 and len(xs) <= MAX_STEPS and xs.dtype.kind in "iu", (xs, xs.dtype)
    assert ((xs >= 0) & (xs < EMBEDDINGS)).all(), xs


def check_tokens(decoded: Decoded) -> None:
    """Token ids of the text target's vocabulary, at most its ``max_tokens``; a message without tokens
    carries a control; the stream id is UTF-8 text."""
    ids = decoded.xs
    assert type(ids) is list and len(ids) <= MAX_STEPS, ids
    assert all(type(i) is int and 0 <= i < len(TEXT_WORDS) + 1 for i in ids), ids
    assert ids or decoded.control in CONTROLS, decoded
    assert decoded.control is None or decoded.control in CONTROLS, decoded.control
    assert isinstance(decoded.stream_id, str) and decoded.stream_id, decoded.stream_id
    decoded.stream_id.encode()


def check_reading(decoded: Decoded, width: int) -> None:
    check_features(decoded, width, 1, 1e15)
    assert decoded.ts is None or math.isfinite(decoded.ts), decoded.ts


# ---- targets: payload bytes → (decode, check) ------------------------------------------------------------
def _keyed(decoder: Decoder) -> Callable[[bytes], Any]:
    keyed = KeyedDecoder(decoder, max_bytes=4096)
    return lambda data: keyed.decode(Message(data[1:] or None, data[:1] if data[:1] != b"\xff" else None))


def _csv_row(data: bytes) -> dict:
    """A ``csv.DictReader``-like row built from ``data``: known and unknown columns, text values, maybe
    the overflow key ``None`` with a list."""
    fdp = atheris.FuzzedDataProvider(data)
    row: dict = {}
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        key = ROW_KEYS[fdp.ConsumeIntInRange(0, len(ROW_KEYS) - 1)]
        text = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 24))
        row[key] = [text, fdp.ConsumeUnicodeNoSurrogates(4)] if key is None else text
    return row


def _segment(data: bytes) -> Any:
    """An ``AudioDecoder`` payload from ``data``: a segment of any shape, dtype and control, or a refusal."""
    fdp = atheris.FuzzedDataProvider(data)
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0:
        return BadAudio(fdp.ConsumeUnicodeNoSurrogates(16))
    controls = ["start", None, "end", "cancel", "reset", fdp.ConsumeUnicodeNoSurrogates(4), 7]
    control = controls[fdp.ConsumeIntInRange(0, len(controls) - 1)]
    dtype = ["<f4", "<f8", "<i2", "|u1", "<c8"][fdp.ConsumeIntInRange(0, 4)]
    width = [N_MFCC, N_MFCC, 1, 0, 12][fdp.ConsumeIntInRange(0, 4)]
    raw = np.frombuffer(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2048)), np.uint8)
    values = raw[: len(raw) - len(raw) % np.dtype(dtype).itemsize].view(dtype)
    if kind == 1 and width:
        values = values[: len(values) - len(values) % width].reshape(-1, width)
    elif kind == 2:
        values = values.tolist()  # a list, not an array
    return Segment(control, values, 0, 0)


def targets() -> list[tuple[str, Callable[[bytes], Any], Callable[[Any], None]]]:
    """``(name, decode(payload), check(result))`` per target; the first input byte chooses one."""
    flagged_source = _FlaggingSource()
    lines = ReadingDecoder(channels=["temp", "rpm"])
    flagged = FlaggedLineDecoder(flagged_source, lines)  # type: ignore[arg-type]

    def flagged_line(data: bytes) -> Any:
        flagged_source.problem = None if data[:1] != b"!" else "partial line cut by a reconnect"
        return flagged.decode(Message(data[1:], "dev", 0, 0, flagged_source.port))

    rows = ReadingDecoder(channels=["temp", "rpm"], stream_column="machine")
    one = ReadingDecoder(channels=["value"])
    audio = AudioDecoder(N_MFCC)
    text = TextDecoder(Tokenizer((UNKNOWN, *TEXT_WORDS), max_tokens=MAX_STEPS), max_bytes=4096)
    out = [
        (
            "json",
            _keyed(Decoder("json", FEATURES, 0, MAX_STEPS)),
            lambda d: check_features(d, FEATURES, MAX_STEPS),
        ),
        (
            "msgpack",
            _keyed(Decoder("msgpack", FEATURES, 0, MAX_STEPS)),
            lambda d: check_features(d, FEATURES, MAX_STEPS),
        ),
        (
            "float32",
            _keyed(Decoder("float32", FEATURES, 0, MAX_STEPS)),
            lambda d: check_features(d, FEATURES, MAX_STEPS),
        ),
        ("categorical", _keyed(Decoder("json", FEATURES, EMBEDDINGS, MAX_STEPS)), check_ids),
        ("feedback", lambda data: decode_feedback(data or None), lambda fb: None),
        ("reading bytes", lambda data: one.decode(Message(data, "dev")), lambda d: check_reading(d, 1)),
        (
            "reading text",
            lambda data: lines.decode(Message(data.decode(errors="replace"), "dev")),
            lambda d: check_reading(d, 2),
        ),
        ("csv row", lambda data: rows.decode(Message(_csv_row(data))), lambda d: check_reading(d, 2)),
        ("serial line", flagged_line, lambda d: check_reading(d, 2)),
        (
            "audio segment",
            lambda data: audio.decode(Message(_segment(data), b"mic")),
            lambda d: check_features(d, N_MFCC, 1 << 30),
        ),
        (
            "text",
            lambda data: text.decode(Message(data[1:], data[:1] if data[:1] != b"\xff" else None)),
            check_tokens,
        ),
    ]
    return out


SEEDS = {
    "json": [b'k{"x": [1.5, -2, 3e3]}', b'k{"x": [[1,2,3],[4,5,6]], "ts": 1.5}', b'k{"control": "end"}'],
    "msgpack": [b"k" + msgpack.packb({"x": [1.0, 2.0, 3.0]}), b"k" + msgpack.packb({"control": "start"})],
    "float32": [b"k" + np.arange(6, dtype="<f4").tobytes()],
    "categorical": [b'k{"x": [1, 2, 9]}', b'k{"x": 3, "label": 1}'],
    "feedback": [
        b'{"label": 1, "last": 3}',
        b'{"label": [0.5], "offsets": [1, 4]}',
        b'{"label": 0, "start": -4}',
    ],
    "reading bytes": [
        b'{"ts": 1700000000, "value": 3.2}',
        b"2014-04-01 00:00:00,3.5",
        b'{"stream": "a", "value": 1}',
    ],
    "reading text": [b'{"ts": 1, "values": {"temp": 3.2, "rpm": 1200}}', b"1700000000,20.5,1200"],
    "csv row": [b"\x03\x00\x101700000000\x01\x0420.5\x02\x041200\x03\x02m1"],
    "serial line": [b" 1700000000,20.5,1200", b"!1700000000,20.5,1200"],
    "audio segment": [b"\x01\x00\x00\x00" + np.ones(26, "<f4").tobytes()],
    "text": [b'k{"text": "Great phone!", "control": "end"}', b'\xff{"text": "awful", "user": "u1"}'],
}


def seed(corpus: Path, names: list[str]) -> None:
    """Valid inputs of each target into an empty ``corpus``."""
    if any(corpus.iterdir()):
        return
    for index, name in enumerate(names):
        for k, payload in enumerate(SEEDS[name]):
            (corpus / f"seed-{index}-{k}").write_bytes(bytes([index]) + payload)


def break_a_decoder() -> None:
    """``--break``: the payload decoder forgets its check of float32 frames (NaN, Inf, too many
    timesteps), the bug the harness must report."""
    Decoder._checked_features = lambda self, xs: xs  # type: ignore[method-assign]


class Harness:
    """``TestOneInput`` for atheris, counting outcomes per target (``summary``)."""

    def __init__(self, summary: Path | None) -> None:
        self.targets = targets()
        self.summary_path = summary
        self.inputs = 0
        self.counts = {
            name: {"decoded": 0, "refused": 0, "undecodable": 0, "examples": []} for name, *_ in self.targets
        }

    def __call__(self, data: bytes) -> None:
        if not data:
            return
        name, decode, check = self.targets[data[0] % len(self.targets)]
        counts = self.counts[name]
        try:
            result = decode(data[1:])
        except DecodeError as exc:
            counts["refused"] += 1
            if exc.kind == "undecodable":
                counts["undecodable"] += 1
                if len(counts["examples"]) < 3:
                    counts["examples"].append({"input": data[1:200].hex(), "reason": str(exc)[:300]})
        else:
            counts["decoded"] += 1
            check(result)
        self.inputs += 1
        if self.summary_path is not None and self.inputs % 500 == 0:
            self.write_summary()

    def write_summary(self) -> None:
        assert self.summary_path is not None
        self.summary_path.write_text(json.dumps({"inputs": self.inputs, "targets": self.counts}, indent=1))


def main(argv: list[str]) -> None:
    args = list(argv)
    broken = "--break" in args
    if broken:
        args.remove("--break")
    summary = None
    if "--summary" in args:
        i = args.index("--summary")
        summary = Path(args[i + 1])
        del args[i : i + 2]
    if broken:
        break_a_decoder()
    harness = Harness(summary)
    corpora = [Path(a) for a in args[1:] if not a.startswith("-")]
    if corpora:
        corpora[0].mkdir(parents=True, exist_ok=True)
        seed(corpora[0], [name for name, *_ in harness.targets])
    atheris.Setup(args, harness)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
