"""The text decoder (``connectors.text``): a message's text becomes its token ids in order, through the
tokenizer a bundle ships; whatever the bytes, JSON or unicode of a message, it decodes into events the
engine takes or is refused with a reason (``DecodeError``), never anything else."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.base import Message
from connectors.codec import CONTROLS, DecodeError
from connectors.text import UNKNOWN, TextDecoder, Tokenizer

WORDS = ["great", "phone", "awful", "battery", "not", "good", "!", ",", "é", "日本"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer((UNKNOWN, *WORDS), max_tokens=MAX_TOKENS)


def test_tokens_are_vocabulary_indices_in_order_and_unknown_words_the_unknown_id(tokenizer):
    assert tokenizer.encode("Great phone, AWFUL battery!!") == [1, 2, 8, 3, 4, 7, 7]
    assert tokenizer.encode("great zebra") == [1, 0]
    assert tokenizer.encode("ＧＲＥＡＴ") == [1]  # NFKC: fullwidth letters are the same word
    assert tokenizer.encode("日本 é") == [10, 9]
    assert tokenizer.encode(" \t\n") == []
    assert tokenizer.encode("great\x00\u200b\x07!") == [1, 7]  # control/format characters: no tokens


def test_a_text_of_more_tokens_than_max_tokens_is_refused_not_cut(tokenizer):
    assert len(tokenizer.encode(" ".join(["good"] * MAX_TOKENS))) == MAX_TOKENS
    with pytest.raises(DecodeError, match="oversized") as err:
        tokenizer.encode(" ".join(["good"] * (MAX_TOKENS + 1)))
    assert err.value.kind == "oversized"


def test_the_tokenizer_travels_in_model_features_and_fits_a_vocabulary_from_texts(tokenizer):
    assert (
        Tokenizer.from_features({"tokenizer": json.loads(json.dumps(tokenizer.to_features()))}) == tokenizer
    )
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_features({"classes": ["a"]})
    fitted = Tokenizer.fit(["b a a", "A c b", "d"], min_count=2)
    assert fitted.vocabulary == (UNKNOWN, "a", "b")  # by count, then alphabetical; "c", "d" seen once
    assert fitted.encode("c a") == [0, 1]


def test_messages_of_every_form_decode_to_their_tokens_control_and_stream(tokenizer):
    decoder = TextDecoder(tokenizer, stream_key="user")
    doc = decoder.decode(Message(b'{"text": "not good", "user": "u1", "ts": 5, "control": "end"}'))
    assert (doc.xs, doc.control, doc.stream_id, doc.ts) == ([5, 6], "end", "u1", 5)
    keyed = decoder.decode(Message('{"text": "great"}', b"k1"))  # a Kafka/MQTT key names the stream
    assert (keyed.xs, keyed.stream_id, keyed.control) == ([1], "k1", None)
    row = decoder.decode(Message({"timestamp": "1", "user": "u2", "text": "phone", "control": "  "}))
    assert (row.xs, row.stream_id, row.control) == ([2], "u2", None)
    end_only = decoder.decode(Message({"user": "u2", "text": "", "control": " end"}))
    assert (end_only.xs, end_only.control) == ([], "end")
    renamed = TextDecoder(tokenizer, text_key="body", control_key="ctl", stream_key="from")
    doc = renamed.decode(Message(b'{"body": "good", "ctl": "end", "from": "u3"}'))
    assert (doc.xs, doc.control, doc.stream_id) == ([6], "end", "u3")
    with pytest.raises(DecodeError, match="unknown keys"):
        renamed.decode(Message(b'{"text": "good", "from": "u3"}'))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"text": "great"}', "no stream"),
        (b'{"text": 3, "user": "u"}', "must be a string"),
        (b'{"user": "u"}', "missing 'text'"),
        (b'{"text": "  ", "user": "u"}', "no tokens"),
        (b'{"text": "great", "user": "u", "control": "stop"}', "unknown control"),
        (b'{"text": "great", "user": "u", "colour": 1}', "unknown keys"),
        (b'{"text": "great", "user": "u", "ts": NaN}', "finite"),
        (b'{"text": "great", "user": ""}', "non-empty"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "must be an object"),
        (b'{"text": "' + b"x" * 70_000 + b'", "user": "u"}', "oversized"),
        ({"user": "u", "text": "a", None: ["extra"]}, "more fields"),
    ],
)
def test_malformed_messages_are_refused_with_a_reason(tokenizer, payload, reason):
    with pytest.raises(DecodeError, match=reason) as err:
        TextDecoder(tokenizer).decode(Message(payload))
    assert err.value.kind != "undecodable"  # refused by a check, not by the safety net


# ---- structure-aware fuzzing: messages shaped like real ones ------------------------------------------
ODD_TEXT = st.one_of(
    st.text(max_size=60),
    st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "So"]), max_size=40),
    st.lists(
        st.sampled_from([*WORDS, "GREAT", "ＧＲＥＡＴ", "\u0301", "\x00", "🙂", "\ud800"]), max_size=20
    ).map(" ".join),
    st.integers(MAX_TOKENS - 2, 3 * MAX_TOKENS).map(lambda n: "good " * n),  # about the token bound
    st.integers(1, 80_000).map(lambda n: "é" * n),  # huge
)
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
STREAMS = st.one_of(st.text(max_size=12), st.integers(-(2**70), 2**70), ANY_VALUE)
CONTROL_VALUES = st.one_of(st.none(), st.sampled_from([*CONTROLS, "", "END", "stop"]), ANY_VALUE)


@st.composite
def json_messages(draw) -> bytes | str:
    doc: dict = {}
    if draw(st.booleans()):
        doc["text"] = draw(st.one_of(ODD_TEXT, ANY_VALUE) if draw(st.integers(0, 4)) == 0 else ODD_TEXT)
    if draw(st.booleans()):
        doc["user"] = draw(STREAMS)
    if draw(st.booleans()):
        doc["control"] = draw(CONTROL_VALUES)
    if draw(st.integers(0, 4)) == 0:
        doc["ts"] = draw(st.one_of(st.floats(allow_nan=True), ANY_VALUE))
    if draw(st.integers(0, 6)) == 0:
        doc[draw(st.text(max_size=6))] = draw(ANY_VALUE)
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()), allow_nan=True)
    form = draw(st.sampled_from(["bytes", "str", "cut", "flip"]))
    raw = text.encode("utf-8", "surrogatepass")
    if form == "cut":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif form == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    return text if form == "str" else raw


CSV_ROWS = st.dictionaries(
    st.sampled_from(["timestamp", "user", "text", "control", "other", None]),
    st.one_of(ODD_TEXT, st.lists(st.text(max_size=4), max_size=2)),
    max_size=6,
)


def _check_decoded_or_refused(decoder: TextDecoder, message: Message) -> None:
    try:
        decoded = decoder.decode(message)
    except DecodeError as exc:
        assert exc.kind != "undecodable", str(exc)  # a check refused it, not the safety net
        return
    ids = decoded.xs
    assert type(ids) is list and all(type(i) is int for i in ids)
    assert all(0 <= i < decoder.tokenizer.size for i in ids) and len(ids) <= MAX_TOKENS
    assert ids or decoded.control is not None
    assert decoded.control is None or decoded.control in CONTROLS
    assert isinstance(decoded.stream_id, str) and decoded.stream_id
    decoded.stream_id.encode()  # UTF-8 encodable: it becomes a key, a file name, a log line
    payload = message.payload
    if isinstance(payload, bytes | str) and not isinstance(payload, dict):
        doc = json.loads(payload)  # the decoder's fallback parser (orjson refuses lone surrogates)
        if isinstance(doc.get("text"), str):  # the events are the text's tokens, in order
            assert ids == decoder.tokenizer.encode(doc["text"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=json_messages(), key=st.one_of(st.none(), st.binary(max_size=6), st.text(max_size=6)))
def test_any_json_message_decodes_into_valid_token_events_or_is_refused(tokenizer, payload, key):
    _check_decoded_or_refused(TextDecoder(tokenizer), Message(payload, key))


@settings(max_examples=200, deadline=None)
@given(row=CSV_ROWS)
def test_any_csv_row_decodes_into_valid_token_events_or_is_refused(tokenizer, row):
    _check_decoded_or_refused(TextDecoder(tokenizer), Message(row))


@settings(max_examples=200, deadline=None)
@given(payload=st.one_of(st.binary(max_size=200), st.integers(), st.none(), st.lists(st.integers())))
def test_any_payload_at_all_decodes_or_is_refused(tokenizer, payload):
    _check_decoded_or_refused(TextDecoder(tokenizer), Message(payload, b"k"))
