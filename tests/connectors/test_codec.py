"""Payload decoding: every valid form decodes; every invalid one is refused with a reason."""

from __future__ import annotations

import json
import struct

import msgpack
import numpy as np
import pytest

from connectors.codec import DecodeError, Decoder, Feedback, check_label, decode_feedback, encode_document

F = 3


@pytest.fixture
def json_decoder() -> Decoder:
    return Decoder("json", feature_size=F, max_timesteps=8)


def test_json_single_and_multi_timestep(json_decoder):
    one = json_decoder.decode(b'{"x": [1, 2.5, -3]}')
    assert np.asarray(one.xs, np.float32).shape == (1, F) and one.control is None
    many = json_decoder.decode(json.dumps({"x": [[1, 2, 3], [4, 5, 6]], "ts": 12.5, "label": 1}).encode())
    np.testing.assert_array_equal(many.xs, [[1, 2, 3], [4, 5, 6]])
    assert many.ts == 12.5 and many.label == 1


def test_control_messages(json_decoder):
    end = json_decoder.decode(b'{"control": "end"}')
    assert end.control == "end" and len(end.xs) == 0
    assert json_decoder.decode(b'{"x": [1,2,3], "control": "reset"}').control == "reset"


def test_msgpack_and_float32():
    mp = Decoder("msgpack", feature_size=F).decode(msgpack.packb({"x": [[1.0, 2.0, 3.0]] * 4}))
    assert np.asarray(mp.xs).shape == (4, F)
    raw = struct.pack("<6f", 1, 2, 3, 4, 5, 6)
    np.testing.assert_array_equal(Decoder("float32", feature_size=F).decode(raw).xs, [[1, 2, 3], [4, 5, 6]])


def test_categorical():
    dec = Decoder("json", feature_size=1, num_embeddings=10)
    np.testing.assert_array_equal(dec.decode(b'{"x": 4}').xs, [4])
    np.testing.assert_array_equal(dec.decode(b'{"x": [1, 2, 9]}').xs, [1, 2, 9])
    with pytest.raises(DecodeError, match=r"in \[0, 10\)"):
        dec.decode(b'{"x": [1, 10]}')
    with pytest.raises(DecodeError, match="integer"):
        dec.decode(b'{"x": 1.5}')


BAD_JSON = [
    (b"", "not valid json"),
    (b"{not json", "not valid json"),
    (b"\xff\xfe", "not valid json"),
    (b"[1, 2, 3]", "object with key 'x'"),
    (b'{"y": [1, 2, 3]}', "unknown keys"),
    (b'{"ts": 1}', "missing 'x'"),
    (b'{"x": []}', "non-empty list"),
    (b'{"x": "1,2,3"}', "non-empty list"),
    (b'{"x": [1, 2]}', "expected 3 features"),
    (b'{"x": [[1, 2, 3], [1, 2]]}', "timestep 1: expected 3 features"),
    (b'{"x": [1, "2", 3]}', "must be numbers"),
    (b'{"x": [1, true, 3]}', "must be numbers"),
    (b'{"x": [1, NaN, 3]}', "NaN or Inf"),
    (b'{"x": [1, Infinity, 3]}', "NaN or Inf"),
    (b'{"x": [1, 1e39, 3]}', "NaN or Inf"),
    (b'{"x": [1, 2, 3], "control": "explode"}', "unknown control"),
    (b'{"x": [1, 2, 3], "ts": "yesterday"}', "ts must be"),
    (json.dumps({"x": [[0, 0, 0]] * 9}).encode(), "oversized"),
]


@pytest.mark.parametrize("payload,reason", BAD_JSON)
def test_bad_json_payloads(json_decoder, payload, reason):
    with pytest.raises(DecodeError, match=reason):
        json_decoder.decode(payload)


def test_bad_binary_payloads():
    dec = Decoder("float32", feature_size=F, max_timesteps=2)
    for payload, reason in [
        (None, "tombstone"),
        (b"\x00" * 5, "not a multiple of 12"),
        (b"", "not a multiple"),
        (struct.pack("<3f", 1, float("nan"), 2), "NaN"),
        (b"\x00" * 36, "oversized"),
    ]:
        with pytest.raises(DecodeError, match=reason):
            dec.decode(payload)
    with pytest.raises(DecodeError, match="not valid msgpack"):
        Decoder("msgpack", feature_size=F).decode(b"\xc1")


def test_output_carries_its_input_position():
    out = {"y": np.ones((2, 1), np.float32), "partition": 3, "offset": 17, "model_version": 5}
    doc = json.loads(encode_document(out))
    assert doc == {"y": [[1.0], [1.0]], "partition": 3, "offset": 17, "model_version": 5}


def test_feedback_records_decode_every_addressing_form():
    assert decode_feedback(b'{"label": 2}') == Feedback(2)
    assert decode_feedback(b'{"label": [0.5, 1], "last": 4}') == Feedback([0.5, 1], last=4)
    assert decode_feedback(b'{"label": 1, "start": -6, "end": -2}') == Feedback(1, start=-6, end=-2)
    assert decode_feedback(b'{"label": [1, 2, 1], "offsets": [10, 12]}') == Feedback(
        [1, 2, 1], offsets=(10, 12)
    )


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (None, "tombstone"),
        (b"[1, 2]", "key 'label'"),
        (b'{"x": [1]}', "key 'label'"),
        (b'{"label": true}', "class id"),
        (b'{"label": []}', "finite numbers"),
        (b'{"label": [1, "a"]}', "finite numbers"),
        (b'{"label": 1, "last": 0}', "'last' must be >= 1"),
        (b'{"label": 1, "start": 1.5}', "integer"),
        (b'{"label": 1, "offsets": [5, 2]}', "first <= last"),
        (b'{"label": 1, "offsets": [1]}', "first <= last"),
        (b'{"label": 1, "last": 1, "start": 0}', "one way"),
        (b'{"label": 1, "extra": 0}', "unknown feedback keys"),
    ],
)
def test_bad_feedback_is_refused_with_a_reason(payload, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_feedback(payload)


def test_inline_labels_are_checked():
    assert check_label(3) == 3 and check_label([0.1, 2]) == [0.1, 2]
    for bad in ("x", 1.5, None, [float("nan")], [1e39]):
        with pytest.raises(DecodeError):
            check_label(bad)
