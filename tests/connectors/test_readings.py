"""Sensor readings: every valid form decodes; every messy one is refused with a ``DecodeError`` of the
right kind, and nothing else is ever raised (structure-aware fuzzing)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.base import Message
from connectors.codec import Decoded, DecodeError
from connectors.readings import MAX_TS, MIN_TS, ReadingDecoder, parse_timestamp

KINDS = {
    "malformed",
    "oversized",
    "missing_stream",
    "bad_timestamp",
    "missing_value",
    "non_numeric",
    "out_of_range",
    "unknown_channel",
    "missing_channel",
}
ONE = ReadingDecoder()
TWO = ReadingDecoder(channels=["temp", "rpm"])
TS = 1396310400.0  # 2014-04-01 00:00:00 UTC


def decode(payload, key="s1", decoder: ReadingDecoder = ONE) -> Decoded:
    return decoder.decode(Message(payload, key))


def refused(payload, key="s1", decoder: ReadingDecoder = ONE) -> DecodeError:
    """The ``DecodeError`` ``decode`` raises (any other exception fails the test)."""
    with pytest.raises(DecodeError) as info:
        decode(payload, key, decoder)
    assert info.value.kind in KINDS
    assert str(info.value) and "undecodable" not in str(info.value)  # the safety net was not needed
    return info.value


# ---- valid forms -----------------------------------------------------------------------------------
def test_json_single_value():
    d = decode(b'{"ts": 1700000000, "value": 3.2}')
    assert d == Decoded([[3.2]], ts=1700000000.0, stream_id="s1")
    assert d.control is None and d.label is None
    assert decode('{"value": -4}').xs == [[-4.0]] and decode('{"value": -4}').ts is None


def test_json_values_in_channel_order():
    d = decode(b'{"ts": 1.5, "values": {"rpm": 1200, "temp": 3.2}}', decoder=TWO)
    assert d.xs == [[3.2, 1200.0]] and d.ts == 1.5
    assert all(type(v) is float for v in d.xs[0])


def test_json_numeric_strings_and_whitespace():
    assert decode(b' \n {"value": " 3.2 "}').xs == [[3.2]]
    assert decode(b'{"value": "-1e3"}').xs == [[-1000.0]]
    assert decode(b'{"value": ".5"}').xs == [[0.5]]


def test_json_stream_names():
    assert decode(b'{"id": "pump-7", "value": 1}', key=None).stream_id == "pump-7"
    assert decode(b'{"stream": "pump-8", "value": 1}', key=None).stream_id == "pump-8"
    assert decode(b'{"id": 12, "value": 1}', key=None).stream_id == "12"
    assert decode(b'{"id": "a", "stream": "a", "value": 1}', key=None).stream_id == "a"
    assert decode(b'{"id": "ignored", "value": 1}', key=b"from-key").stream_id == "from-key"


def test_line_protocol():
    assert decode(b"2014-04-01 00:00:00,3.5\r\n") == Decoded([[3.5]], ts=TS, stream_id="s1")
    assert decode("1700000000, 1.5 ,  -2", decoder=TWO).xs == [[1.5, -2.0]]
    assert decode(",7").ts is None  # an empty timestamp field: no timestamp


def test_rows():
    row = {"timestamp": "2014-04-01 00:00:00", "value": "69.88", "other": "x"}
    assert decode(row) == Decoded([[69.88]], ts=TS, stream_id="s1")
    by_column = ReadingDecoder(stream_column="sensor")
    assert decode({"sensor": " a ", "value": "1"}, None, by_column).stream_id == "a"
    stamped = ReadingDecoder(timestamp_column="time")
    assert decode({"time": "10", "value": "1"}, decoder=stamped).ts == 10.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2014-04-01 00:00:00", TS),
        ("2014-04-01T00:00:00", TS),
        ("2014-04-01T00:00:00Z", TS),
        ("2014-04-01T02:00:00+02:00", TS),
        ("2014-04-01 00:00:00.250000", TS + 0.25),
        ("2014-04-01", TS),
        ("1396310400", TS),
        (" 1396310400.5 ", TS + 0.5),
        (1396310400, TS),
        (-1.5, -1.5),
        (None, None),
        ("", None),
        ("  ", None),
    ],
)
def test_timestamps(text, seconds):
    assert parse_timestamp(text) == seconds


@pytest.mark.parametrize(
    "value",
    [
        True,
        math.nan,
        math.inf,
        1e300,
        -1e300,
        10**400,
        1700000000000,  # milliseconds: beyond year 9999 as seconds
        "nan",
        "1e999",
        "yesterday",
        "2014-13-01 00:00:00",
        "2014-04-01 00:00:00\x00",
        "2014-04-01 00:00:0\ud800",
        "0x10",
        [1],
        {"t": 1},
    ],
)
def test_bad_timestamps(value):
    with pytest.raises(DecodeError) as info:
        parse_timestamp(value)
    assert info.value.kind == "bad_timestamp"


# ---- messy input -----------------------------------------------------------------------------------
MESSY = [
    # missing values
    ("missing_value", b'{"value": null}', ONE),
    ("missing_value", b'{"value": ""}', ONE),
    ("missing_value", b'{"value": "   "}', ONE),
    ("missing_value", b'{"ts": 1}', ONE),
    ("missing_value", b'{"values": {"temp": null, "rpm": 1}}', TWO),
    ("missing_value", b"2014-04-01 00:00:00", ONE),
    ("missing_value", b"2014-04-01 00:00:00,", ONE),
    ("missing_value", b"1,2", TWO),
    ("missing_value", b"1,,2", TWO),
    ("missing_value", {"timestamp": "1"}, ONE),
    ("missing_value", {"timestamp": "1", "value": ""}, ONE),
    # non-numeric values
    ("non_numeric", b'{"value": "abc"}', ONE),
    ("non_numeric", b'{"value": true}', ONE),
    ("non_numeric", b'{"value": [1]}', ONE),
    ("non_numeric", b'{"value": {"v": 1}}', ONE),
    ("non_numeric", b'{"value": "0x10"}', ONE),
    ("non_numeric", b'{"value": "1_000"}', ONE),
    ("non_numeric", b'{"value": "3,2"}', ONE),
    ("non_numeric", '{"value": "\u0661\u0662"}', ONE),  # Arabic-Indic digits: float() would take them
    ("non_numeric", b'{"value": "1\\u0000"}', ONE),
    ("non_numeric", b"1,abc", ONE),
    ("non_numeric", b"1,3.2\x00", ONE),
    ("non_numeric", b"1,1_000", ONE),
    ("non_numeric", {"timestamp": "1", "value": "0x10"}, ONE),
    ("non_numeric", {"timestamp": "1", "value": "3,2"}, ONE),
    ("non_numeric", {"timestamp": "1", "value": ["1"]}, ONE),
    # out of range
    ("out_of_range", b'{"value": NaN}', ONE),
    ("out_of_range", b'{"value": -Infinity}', ONE),
    ("out_of_range", b'{"value": 1e308}', ONE),
    ("out_of_range", b'{"value": 1e999}', ONE),
    ("out_of_range", b'{"value": ' + b"9" * 400 + b"}", ONE),
    ("out_of_range", b'{"value": ' + b"9" * 5000 + b"}", ONE),  # beyond int()'s 4300 digits
    ("out_of_range", b'{"value": 18446744073709551615}', ONE),
    ("out_of_range", b'{"value": "nan"}', ONE),
    ("out_of_range", b'{"value": "-infinity"}', ONE),
    ("out_of_range", b'{"value": "1e999"}', ONE),
    ("out_of_range", b"1,1e308", ONE),
    ("out_of_range", b"1,inf", ONE),
    ("out_of_range", {"timestamp": "1", "value": "NaN"}, ONE),
    ("out_of_range", {"timestamp": "1", "value": "1" * 400}, ONE),
    # channels
    ("unknown_channel", b'{"values": {"temp": 1, "rpm": 2, "volts": 3}}', TWO),
    ("unknown_channel", b"1,2,3,4", TWO),
    ("unknown_channel", b"1,3,2", ONE),  # a locale-style decimal comma
    ("missing_channel", b'{"values": {"temp": 1}}', TWO),
    ("missing_channel", b'{"values": {}}', TWO),
    # timestamps
    ("bad_timestamp", b'{"ts": "yesterday", "value": 1}', ONE),
    ("bad_timestamp", b'{"ts": true, "value": 1}', ONE),
    ("bad_timestamp", b'{"ts": NaN, "value": 1}', ONE),
    ("bad_timestamp", b'{"ts": 1e999, "value": 1}', ONE),
    ("bad_timestamp", b'{"ts": [1], "value": 1}', ONE),
    ("bad_timestamp", b"timestamp,value", ONE),  # a header line
    ("bad_timestamp", {"timestamp": "01/04/2014", "value": "1"}, ONE),
    # size
    ("oversized", b'{"value": 1, "pad": "' + b"x" * 70_000 + b'"}', ONE),
    ("oversized", "1," + "1" * 70_000, ONE),
    ("oversized", "1,\u00e9" + "\u00e9" * 40_000, ONE),  # fewer characters than bytes
    ("oversized", {"timestamp": "1", "value": "1" * 70_000}, ONE),
    # structure
    ("malformed", b"", ONE),
    ("malformed", b"   \r\n", ONE),
    ("malformed", None, ONE),
    ("malformed", 42, ONE),
    ("malformed", b"\xff\xfe1,2", ONE),
    ("malformed", b"1,2\xc3", ONE),
    ("malformed", "1,\ud800", ONE),
    ("malformed", b'{"value": 1', ONE),
    ("malformed", b'{"value": 1}\x00', ONE),
    ("malformed", b'{"value": 1} {"value": 2}', ONE),
    ("malformed", b'{"value": "\\ud800"}', ONE),  # a lone surrogate escape... read, then refused below
    ("malformed", b'{"value": 1, "x": 2}', ONE),
    ("malformed", b'{"value": 1, "values": {"value": 1}}', ONE),
    ("malformed", b'{"value": 1}', TWO),
    ("malformed", b'{"values": [1, 2]}', TWO),
    ("malformed", b'{"values": ' + b"[" * 5000 + b"]" * 5000 + b"}", ONE),
    ("malformed", b'{"values": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}", ONE),
    ("malformed", b"1,2\n3,4", ONE),
    ("malformed", {"timestamp": "1", "value": "1", None: ["extra"]}, ONE),
    ("malformed", {None: "csv: field larger than field limit (131072)"}, ONE),
]


@pytest.mark.parametrize(("kind", "payload", "decoder"), MESSY)
def test_messy_input_is_refused_with_its_kind(kind, payload, decoder):
    if payload == b'{"value": "\\ud800"}':  # stdlib JSON reads the escape; the value is not a number
        kind = "non_numeric"
    assert refused(payload, decoder=decoder).kind == kind


@pytest.mark.parametrize(
    ("payload", "key", "decoder", "kind"),
    [
        (b'{"value": 1}', None, ONE, "missing_stream"),
        (b'{"id": "", "value": 1}', None, ONE, "missing_stream"),
        (b'{"id": null, "value": 1}', None, ONE, "missing_stream"),
        (b'{"id": true, "value": 1}', None, ONE, "missing_stream"),
        (b'{"id": 1e3, "value": 1}', None, ONE, "missing_stream"),
        (b'{"id": "a", "stream": "b", "value": 1}', None, ONE, "malformed"),
        (b'{"id": "\\ud800", "value": 1}', None, ONE, "malformed"),
        (b"1,2", None, ONE, "missing_stream"),
        ({"value": "1"}, None, ONE, "missing_stream"),
        ({"value": "1"}, None, ReadingDecoder(stream_column="sensor"), "missing_stream"),
        ({"value": "1", "sensor": " "}, None, ReadingDecoder(stream_column="sensor"), "missing_stream"),
        (b'{"value": 1}', b"\xff\xfe", ONE, "malformed"),
        (b'{"value": 1}', "", ONE, "missing_stream"),
        (b'{"value": 1}', 7, ONE, "malformed"),
    ],
)
def test_stream_ids(payload, key, decoder, kind):
    assert refused(payload, key, decoder).kind == kind


def test_extra_channels_ignored_when_asked():
    lenient = ReadingDecoder(channels=["temp", "rpm"], extra_channels="ignore")
    assert decode(b'{"values": {"temp": 1, "rpm": 2, "volts": "junk"}}', decoder=lenient).xs == [[1.0, 2.0]]
    assert decode(b"1,1,2,junk", decoder=lenient).xs == [[1.0, 2.0]]
    assert refused(b'{"values": {"temp": 1}}', decoder=lenient).kind == "missing_channel"


def test_max_abs_value_bounds_values():
    small = ReadingDecoder(max_abs_value=100.0)
    assert decode(b"1,-100", decoder=small).xs == [[-100.0]]
    assert refused(b"1,100.5", decoder=small).kind == "out_of_range"
    assert refused(b'{"value": 1e16}').kind == "out_of_range"
    assert decode(b'{"value": 1e15}').xs == [[1e15]]


def test_max_bytes_is_a_byte_count():
    tiny = ReadingDecoder(max_bytes=10)
    assert decode(b"1,12345678", decoder=tiny).xs == [[12345678.0]]  # exactly 10 bytes
    assert refused(b"1,123456789", decoder=tiny).kind == "oversized"
    assert refused("1,\u00e9\u00e9\u00e9\u00e9\u00e9", decoder=tiny).kind == "oversized"  # 7 chars, 12 bytes


def test_reasons_name_the_channel_and_stay_short():
    err = refused(b'{"values": {"temp": "x" , "rpm": 1}}', decoder=TWO)
    assert "temp" in str(err) and err.kind == "non_numeric"
    err = refused(b'{"value": "' + b"y" * 60_000 + b'"}')
    assert len(str(err)) < 200


def test_safety_net_turns_a_bug_into_a_decode_error(monkeypatch):
    def broken(self, row, key):
        raise KeyError("bug")

    monkeypatch.setattr(ReadingDecoder, "_row", broken)
    with pytest.raises(DecodeError, match="undecodable reading") as info:
        decode({"value": "1"})
    assert info.value.kind == "malformed"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channels": []},
        {"channels": ["a", "a"]},
        {"channels": ["a", ""]},
        {"extra_channels": "drop"},
        {"max_abs_value": 0},
        {"max_bytes": 0},
    ],
)
def test_bad_configuration(kwargs):
    with pytest.raises(ValueError):
        ReadingDecoder(**kwargs)


# ---- fuzzing ---------------------------------------------------------------------------------------
CHANNELS = ["temp", "rpm"]
FUZZ = [
    ReadingDecoder(),
    ReadingDecoder(channels=CHANNELS),
    ReadingDecoder(channels=CHANNELS, extra_channels="ignore"),
    ReadingDecoder(channels=CHANNELS, stream_column="sensor", max_abs_value=1e6),
]
FUZZ_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def texts(max_size: int) -> st.SearchStrategy[str]:
    """Any text, lone surrogates and NUL included (``st.text`` leaves surrogates out by default)."""
    return st.text(st.characters(exclude_categories=()), max_size=max_size)


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | texts(max_size=12)
    | st.sampled_from(["nan", "1e999", "infinity", "0x10", "1_000", "3,2", " 4.5 ", "", "\x00", "1e308"])
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(texts(max_size=6), children, max_size=3)
    ),
    max_leaves=12,
)
key_names = st.sampled_from(["ts", "value", "values", "id", "stream", "temp", "rpm", "x"]) | texts(6)
good_numbers = st.floats(-1e6, 1e6) | st.integers(-(10**6), 10**6)
numbers = st.one_of(
    good_numbers,
    good_numbers.map(lambda v: f" {v!r} "),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.sampled_from([True, False, None, "", "nan", "1_000", "0x10", "\udc80"]),
    json_values,
)
good_timestamps = st.one_of(
    st.none(),
    st.floats(0, 4e9),
    st.integers(0, 4 * 10**9),
    st.datetimes().map(lambda t: t.isoformat(sep=" ")),
    st.integers(0, 4 * 10**9).map(str),
)
timestamps = st.one_of(
    good_timestamps,
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["garbage", "2014-04-01 25:00:00", "2014-04-01 00:00:00\x00", "0x10", "nan"]),
    json_values,
)
stream_names = st.sampled_from(["s1", "pump-7", "\ud800", "", True]) | texts(6) | st.integers() | json_values
message_keys = st.sampled_from(["s1", "s1", b"s1", None, None, b"\xff", "", "\udc80"]) | texts(4)


@st.composite
def readings(draw, channels: list[str]) -> dict:
    """A reading-shaped JSON object for ``channels``, then mutated: keys dropped, added or replaced."""
    doc: dict = {}
    if draw(st.booleans()):
        doc["ts"] = draw(timestamps)
    if len(channels) == 1 and draw(st.booleans()):
        doc["value"] = draw(numbers)
    else:
        names = [c for c in channels if draw(st.integers(0, 9))]  # most often all of them
        names += draw(st.lists(st.sampled_from(["value", "x"]) | texts(4), max_size=2)) * draw(st.booleans())
        doc["values"] = {n: draw(numbers) for n in names}
    if draw(st.booleans()):
        doc[draw(st.sampled_from(["id", "stream"]))] = draw(stream_names)
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        op = draw(st.sampled_from(["drop", "add", "replace"]))
        if op == "drop" and doc:
            doc.pop(draw(st.sampled_from(sorted(doc))))
        elif op == "add":
            doc[draw(key_names)] = draw(json_values)
        elif doc:
            doc[draw(st.sampled_from(sorted(doc)))] = draw(json_values)
    return doc


def _json_bytes(doc: object, how: str) -> bytes | str:
    text = json.dumps(doc, allow_nan=True, ensure_ascii=how == "ascii")  # NaN/Infinity literals, big ints
    return text if how == "str" else text.encode("utf-8", "surrogatepass")


fields = st.one_of(
    good_numbers.map(repr),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers().map(str),
    st.sampled_from(
        ["", " ", "nan", "1e999", "0x10", "1_000", "2014-04-01 00:00:00", "\x00", "{", "-", "\udc80"]
    ),
    texts(max_size=8),
)
rows = st.dictionaries(
    st.sampled_from(["timestamp", "value", "temp", "rpm", "sensor", None]) | texts(max_size=5),
    texts(max_size=10) | fields | st.lists(texts(max_size=3), max_size=3),
    max_size=6,
)


def as_number(v: object) -> float:
    """What a value the decoder accepted must have meant."""
    assert not isinstance(v, bool) and isinstance(v, int | float | str), v
    return float(v.strip()) if isinstance(v, str) else float(v)


def check(decoder: ReadingDecoder, message: Message) -> Decoded | None:
    """``decode`` returns a valid one-timestep reading or raises ``DecodeError``: nothing else."""
    try:
        d = decoder.decode(message)
    except DecodeError as exc:
        assert exc.kind in KINDS, exc.kind
        assert "undecodable" not in str(exc), str(exc)  # the safety net caught an unexpected exception
        return None
    assert type(d) is Decoded and d.control is None and d.label is None
    assert type(d.xs) is list and len(d.xs) == 1 and len(d.xs[0]) == len(decoder.channels)
    assert all(type(v) is float and abs(v) <= decoder.max_abs_value for v in d.xs[0])
    assert d.ts is None or (type(d.ts) is float and MIN_TS <= d.ts <= MAX_TS)
    assert type(d.stream_id) is str and d.stream_id
    d.stream_id.encode()  # UTF-8-encodable: sinks and state files can carry it
    return d


@FUZZ_SETTINGS
@given(st.data(), st.sampled_from(FUZZ), st.sampled_from(["utf8", "ascii", "str"]), message_keys)
def test_fuzz_json_readings(data, decoder, how, key):
    doc = data.draw(readings(decoder.channels))
    d = check(decoder, Message(_json_bytes(doc, how), key))
    if d is None:
        return
    assert set(doc) <= {"ts", "value", "values", "id", "stream"}
    given_values = {decoder.channels[0]: doc["value"]} if "value" in doc else doc["values"]
    assert d.xs[0] == [as_number(given_values[c]) for c in decoder.channels]
    if key is None:
        assert d.stream_id == str(doc.get("id", doc.get("stream")))


@FUZZ_SETTINGS
@given(json_values, message_keys, st.sampled_from(FUZZ))
def test_fuzz_any_json(value, key, decoder):
    check(decoder, Message(_json_bytes(value, "utf8"), key))


@FUZZ_SETTINGS
@given(st.binary(max_size=120), st.sampled_from([b"", b"{", b" {", b"1,", b'{"value": ']), message_keys)
def test_fuzz_raw_bytes(raw, prefix, key):
    for decoder in FUZZ:
        check(decoder, Message(prefix + raw, key))


@FUZZ_SETTINGS
@given(
    st.lists(fields, min_size=0, max_size=5),
    st.sampled_from([",", ",", ", ", ";", "\t", ",,", " "]),
    st.sampled_from(["", "\n", "\r\n", "\x00"]),
    st.booleans(),
    message_keys,
)
def test_fuzz_lines(parts, sep, end, as_bytes, key):
    line = sep.join(parts) + end
    payload = line.encode("utf-8", "surrogatepass") if as_bytes else line
    for decoder in FUZZ:
        d = check(decoder, Message(payload, key))
        if d is not None:
            assert sep.strip(" ") == "," and len(parts) > len(decoder.channels)
            assert d.xs[0] == [as_number(v) for v in parts[1 : 1 + len(decoder.channels)]]


@FUZZ_SETTINGS
@given(rows, message_keys)
def test_fuzz_rows(row, key):
    for decoder in FUZZ:
        d = check(decoder, Message(row, key))
        if d is not None:
            assert None not in row
            assert d.xs[0] == [as_number(row[c]) for c in decoder.channels]


@FUZZ_SETTINGS
@given(
    st.lists(st.floats(-1e15, 1e15), min_size=2, max_size=2),
    good_timestamps,
    st.sampled_from(["key", "id", "stream"]),
    st.sampled_from(["json", "line", "row"]),
)
def test_fuzz_valid_readings_round_trip(values, ts, named_by, form):
    """Every valid reading decodes to its values, in every form: nothing valid is refused."""
    temp, rpm = values
    key = "s1" if named_by == "key" or form != "json" else None
    ts_text = "" if ts is None else str(ts)
    if form == "json":
        doc = {"values": {"rpm": rpm, "temp": temp}, **({"ts": ts} if ts is not None else {})}
        payload: object = json.dumps({**doc, **({named_by: "s1"} if key is None else {})})
    elif form == "line":
        payload = f"{ts_text},{temp!r},{rpm!r}"
    else:
        payload = {"rpm": repr(rpm), "temp": f" {temp!r}", "timestamp": ts_text, "other": "junk"}
    d = TWO.decode(Message(payload, key))
    assert d.xs == [[temp, rpm]] and d.stream_id == "s1"
    assert d.ts == parse_timestamp(ts_text) and (ts is None) == (d.ts is None)
