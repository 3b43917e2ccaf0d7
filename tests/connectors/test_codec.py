"""Payload decoding: every valid form decodes; every invalid one is refused with a reason."""

from __future__ import annotations

import json
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.base import Message
from connectors.codec import (
    DecodeError,
    Decoder,
    Feedback,
    KeyedDecoder,
    check_label,
    decode_feedback,
    encode_document,
)

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


# ---- structure-aware fuzzing: documents built from the format's own shape, then encoded ----------------
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["start", "end", "reset", "explode", "x"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.sampled_from(["x", "ts", "a", ""]), inner, max_size=3)
    ),
    max_leaves=40,
)
_rows = st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=5)
_x = st.one_of(_values, _rows, st.lists(_rows, max_size=6), st.lists(st.integers(-5, 12), max_size=6))
_documents = st.fixed_dictionaries(
    {},
    optional={"x": _x, "ts": _values, "label": _values, "control": _values, "extra": _values},
)


def _deeply_nested(depth: int, key: str) -> bytes:
    return (f'{{"{key}": ' + "[" * depth + "]" * depth + "}").encode()


@st.composite
def _payloads(draw: st.DrawFn) -> bytes:
    """A document of the event format's shape (any key may hold anything, at any depth) as JSON or
    msgpack, sometimes nested thousands deep or with bytes overwritten."""
    kind = draw(st.sampled_from(["json", "msgpack", "deep", "mutated"]))
    if kind == "deep":
        return _deeply_nested(draw(st.integers(900, 20_000)), draw(st.sampled_from(["x", "ts", "label"])))
    doc = draw(_documents)
    if kind == "msgpack":
        return msgpack.packb(doc, default=str)
    data = bytearray(json.dumps(doc, default=str).encode())
    if kind == "mutated" and data:
        at = draw(st.integers(0, len(data) - 1))
        data[at : at + 4] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=_payloads(), encoding=st.sampled_from(["json", "msgpack", "float32"]), categorical=st.booleans()
)
def test_no_payload_makes_a_decoder_raise_anything_but_a_decode_error(payload, encoding, categorical):
    """Whatever the payload, ``Decoder.decode`` (behind ``KeyedDecoder``) returns an event the engine takes
    (finite float32-range features of the model's width, or ids in range) or raises ``DecodeError``."""
    if encoding == "float32" and categorical:
        return
    decoder = KeyedDecoder(Decoder(encoding, 3, 7 if categorical else 0))
    try:
        got = decoder.decode(Message(payload, b"stream"))
    except DecodeError as exc:
        assert str(exc)
        return
    xs = np.asarray(got.xs)
    if categorical:
        assert xs.ndim == 1 and ((xs >= 0) & (xs < 7)).all()
    elif len(xs):
        assert xs.shape[1:] == (3,) and np.isfinite(xs.astype(np.float64)).all()
        assert (np.abs(xs.astype(np.float64)) <= np.finfo(np.float32).max).all()
    assert got.control in (None, "start", "end", "reset")
    assert got.ts is None or np.isfinite(got.ts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=_payloads())
def test_no_feedback_record_makes_its_decoder_raise_anything_but_a_decode_error(payload):
    try:
        decode_feedback(payload)
    except DecodeError as exc:
        assert str(exc)


@settings(max_examples=300, deadline=None)
@given(doc=_documents, features=st.sampled_from([1, 3]))
def test_the_common_case_shortcut_decodes_as_the_general_path(doc, features):
    """``{"x": [f1, ..., fF]}`` skips the general document checks: same event or same refusal."""
    decoder = Decoder("json", features)
    payload = json.dumps(doc, default=str).encode()

    def general() -> object:
        try:
            parsed = json.loads(payload)
            if type(parsed) is not dict:
                raise DecodeError("not an object")
            got = decoder._document(parsed, "s")
            return np.asarray(got.xs, np.float64).tolist(), got.control, got.label, got.ts
        except (DecodeError, ValueError) as exc:
            return type(exc)

    def shortcut() -> object:
        try:
            got = decoder.decode(payload, "s")
            return np.asarray(got.xs, np.float64).tolist(), got.control, got.label, got.ts
        except (DecodeError, ValueError) as exc:
            return type(exc)

    assert shortcut() == general()


@pytest.mark.parametrize(
    "payload",
    [b'{"x":[0.5]}', b'{"x":[1]}', b'{"x":[-3.4e38]}', b'{"x":[3.5e38]}', b'{"x":[true]}', b'{"x":["1"]}',
     b'{"x":[NaN]}', b'{"x":[1, 2]}', b'{"x":[[1]]}', b'{"x":[]}', b'{"y":[1]}'],
)  # fmt: skip
def test_single_feature_payloads_decode_or_are_refused_as_before(payload):
    decoder = Decoder("json", 1)
    try:
        got = decoder.decode(payload, "s")
    except DecodeError as exc:
        assert payload in (b'{"x":[3.5e38]}', b'{"x":[true]}', b'{"x":["1"]}', b'{"x":[NaN]}',
                           b'{"x":[1, 2]}', b'{"x":[]}', b'{"y":[1]}'), str(exc)  # fmt: skip
        return
    assert got.xs == [json.loads(payload)["x"]] or got.xs == json.loads(payload)["x"]
    assert got.stream_id == "s" and got.control is None
