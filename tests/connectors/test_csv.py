"""CSV replay: NAB files, many files merged in timestamp order, stream columns, resuming from positions,
real-pace replay, and junk files that never break ``poll``."""

from __future__ import annotations

import csv
import itertools
import json
import os
import time
from pathlib import Path

import pytest

import connectors.csv as csv_source
from connectors.base import Message, Source
from connectors.codec import DecodeError
from connectors.csv import CsvSource
from connectors.readings import ReadingDecoder

NAB = Path(__file__).resolve().parents[3] / "shared" / "data" / "nab" / "data" / "realKnownCause"


def _no_data(why: str) -> None:
    """The shared datasets sit beside the checkout (CI has them): missing there is a failure, not a skip."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why} (CI=true: ../shared/data must be there)")
    pytest.skip(why)


class Assignment:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []

    def assigned(self, partitions: list[int]) -> None:
        self.calls.append(("assigned", partitions))

    def revoked(self, partitions: list[int]) -> None:
        self.calls.append(("revoked", partitions))


def opened(source: CsvSource, resume: dict | None = None) -> CsvSource:
    source.open(Assignment(), resume or {})
    return source


def drain(source: CsvSource, timeout_s: float = 0.005, deadline_s: float = 30.0) -> list[Message]:
    out: list[Message] = []
    stop = time.monotonic() + deadline_s
    while not source.exhausted:
        out.extend(source.poll(timeout_s))
        assert time.monotonic() < stop, "the source never finished"
    assert source.poll(timeout_s) == []
    return out


def write_csv(path: Path, rows: list[list[object]], header: list[str] | None = None) -> Path:
    lines = [",".join(header or ["timestamp", "value"])] + [",".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def rows_of(messages: list[Message]) -> list[tuple[str, dict]]:
    return [(m.topic, m.payload) for m in messages]


# ---- NAB -------------------------------------------------------------------------------------------
@pytest.fixture
def nab_file() -> Path:
    path = NAB / "ambient_temperature_system_failure.csv"
    if not path.exists():
        _no_data(f"NAB data not found at {path}")
    return path


def test_nab_replay(nab_file):
    with open(nab_file, newline="") as f:
        expected = list(csv.DictReader(f))
    source = opened(CsvSource([nab_file]))
    assert isinstance(source, Source) and source.guarantee == "replayable"
    messages = drain(source)
    assert [m.payload for m in messages] == expected and len(expected) > 7000
    assert [m.position for m in messages] == list(range(len(expected)))
    assert {m.key for m in messages} == {nab_file.stem} and {m.topic for m in messages} == {str(nab_file)}
    assert {m.partition for m in messages} == {0}
    assert source.positions() == {"rows": {str(nab_file): len(expected)}}
    decoder = ReadingDecoder()
    decoded = [decoder.decode(m) for m in messages]
    assert decoded[0].ts == 1372896000.0  # 2013-07-04 00:00:00 UTC
    assert decoded[0].xs == [[float(expected[0]["value"])]] and decoded[-1].stream_id == nab_file.stem
    source.close()


def test_nab_files_merge_in_time_order():
    paths = sorted(NAB.glob("*.csv"))[:4] if NAB.exists() else []
    if len(paths) < 2:
        _no_data(f"NAB data not found at {NAB}")
    source = opened(CsvSource(paths))
    messages = drain(source)
    decoder = ReadingDecoder()
    per_file: dict[str, list[dict]] = {}
    for m in messages:
        per_file.setdefault(m.topic, []).append(m.payload)
    for p in paths:  # every row of every file, each file in its own order
        with open(p, newline="") as f:
            assert per_file[str(p)] == list(csv.DictReader(f))
    ts = [decoder.decode(m).ts for m in messages]
    heads = [(t, m.topic) for t, m in zip(ts, messages, strict=True)]
    # the merge takes the earliest head; a file going back in time (NAB has one) keeps its own order
    backwards = sum(1 for (a, pa), (b, pb) in itertools.pairwise(heads) if b < a and pa != pb)
    assert backwards == 0
    source.close()


# ---- merging ---------------------------------------------------------------------------------------
def test_files_merge_by_timestamp_then_file_then_row(tmp_path):
    a = write_csv(tmp_path / "a.csv", [[1, 10], [3, 11], [3, 12], [7, 13]])
    b = write_csv(tmp_path / "b.csv", [[2, 20], [3, 21], [5, 22]])
    c = write_csv(tmp_path / "c.csv", [["1970-01-01 00:00:03", 30], ["1970-01-01 00:00:06", 31]])
    messages = drain(opened(CsvSource([a, b, c])))
    got = [(m.key, m.payload["value"]) for m in messages]
    assert got == [
        ("a", "10"),
        ("b", "20"),
        ("a", "11"),
        ("a", "12"),
        ("b", "21"),
        ("c", "30"),
        ("b", "22"),
        ("c", "31"),
        ("a", "13"),
    ]
    assert [m.position for m in messages] == list(range(9))
    assert all(m.topic == str(tmp_path / f"{m.key}.csv") for m in messages)


def test_unparseable_timestamps_keep_their_place(tmp_path):
    a = write_csv(tmp_path / "a.csv", [[1, 10], ["junk", 11], [4, 12]])
    b = write_csv(tmp_path / "b.csv", [["", 20], [2, 21], [3, 22]])
    messages = drain(opened(CsvSource([a, b])))
    assert [(m.key, m.payload["value"]) for m in messages] == [
        ("b", "20"),  # no timestamp before any other: first
        ("a", "10"),
        ("a", "11"),  # right after its predecessor
        ("b", "21"),
        ("b", "22"),
        ("a", "12"),
    ]
    decoder = ReadingDecoder()
    with pytest.raises(DecodeError) as info:
        decoder.decode(messages[2])
    assert info.value.kind == "bad_timestamp"
    assert decoder.decode(messages[0]).ts is None


def test_many_files_are_many_streams(tmp_path):
    paths = [write_csv(tmp_path / f"s{i:03d}.csv", [[t, i] for t in range(5)]) for i in range(50)]
    messages = drain(opened(CsvSource(paths)))
    assert len(messages) == 250
    assert [m.key for m in messages[:50]] == [f"s{i:03d}" for i in range(50)]  # t=0 of every file first
    assert [int(m.payload["timestamp"]) for m in messages] == sorted(t for t in range(5) for _ in range(50))


def test_reading_is_lazy_and_polls_are_bounded(tmp_path):
    path = tmp_path / "big.csv"
    with open(path, "w") as f:
        f.write("timestamp,value\n")
        for t in range(60_000):
            f.write(f"{t},{t % 7}\n")
    source = opened(CsvSource([path]))
    first = source.poll(0.0)
    assert len(first) == csv_source.MAX_BATCH
    handle = source._files[0]._handle
    assert handle is not None and handle.buffer.tell() < path.stat().st_size / 4  # not read whole
    assert len(drain(source)) == 60_000 - csv_source.MAX_BATCH
    source.close()


def test_stream_column(tmp_path):
    path = write_csv(
        tmp_path / "plant.csv",
        [[1, "pump-1", 0.5], [1, "pump-2", 0.7], [2, "pump-1", 0.6], [2, "", 1]],
        header=["timestamp", "sensor", "value"],
    )
    messages = drain(opened(CsvSource([path], stream_column="sensor")))
    assert all(m.key is None for m in messages)
    decoder = ReadingDecoder(stream_column="sensor")
    assert [decoder.decode(m).stream_id for m in messages[:3]] == ["pump-1", "pump-2", "pump-1"]
    with pytest.raises(DecodeError) as info:
        decoder.decode(messages[3])
    assert info.value.kind == "missing_stream"


def test_general_csv_with_other_columns_and_delimiter(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("time\ttemp\trpm\tnote\n2014-04-01T00:00:00Z\t3.5\t1200\tok\n")
    messages = drain(opened(CsvSource([path], timestamp_column="time", delimiter="\t")))
    assert messages[0].payload == {"time": "2014-04-01T00:00:00Z", "temp": "3.5", "rpm": "1200", "note": "ok"}
    decoder = ReadingDecoder(channels=["temp", "rpm"], timestamp_column="time")
    assert decoder.decode(messages[0]).xs == [[3.5, 1200.0]]


# ---- positions, resume, rollback -------------------------------------------------------------------
@pytest.fixture
def three_files(tmp_path) -> list[Path]:
    return [
        write_csv(tmp_path / "a.csv", [[t, t] for t in range(0, 60, 3)] + [["bad", 1]]),
        write_csv(tmp_path / "b.csv", [[t, t] for t in range(0, 60, 2)]),
        write_csv(tmp_path / "c.csv", [[t, t] for t in range(50, 0, -5)]),  # backwards in time
    ]


def test_resume_from_any_point_emits_exactly_the_rest(three_files):
    full = drain(opened(CsvSource(three_files)))
    assert len(full) == 21 + 30 + 10
    for cut in [0, 1, 7, 20, 33, 59, 60, 61]:
        counts = {str(p): sum(1 for m in full[:cut] if m.topic == str(p)) for p in three_files}
        rest = drain(opened(CsvSource(three_files), {"rows": counts}))
        assert rows_of(rest) == rows_of(full[cut:]), cut
        assert [m.position for m in rest] == list(range(cut, len(full)))


def test_resume_from_positions_of_a_run(three_files, monkeypatch):
    full = drain(opened(CsvSource(three_files)))
    monkeypatch.setattr(csv_source, "MAX_BATCH", 7)
    first = opened(CsvSource(three_files))
    seen = first.poll(0.0) + first.poll(0.0) + first.poll(0.0)
    assert len(seen) == 21
    saved = first.positions()
    first.close()
    assert sum(saved["rows"].values()) == 21
    rest = drain(opened(CsvSource(three_files), saved))
    assert rows_of(seen + rest) == rows_of(full)


def test_resume_past_the_end_and_unknown_files(three_files):
    counts = {str(p): 10_000 for p in three_files} | {"/elsewhere.csv": 3}
    source = opened(CsvSource(three_files), {"rows": counts})
    assert source.exhausted and source.poll(0.0) == []


@pytest.mark.parametrize("resume", [{"rows": [1, 2]}, {"rows": {"a": -1}}, {"rows": {"a": "3"}}])
def test_bad_resume_positions(three_files, resume):
    with pytest.raises(ValueError, match="resume positions"):
        CsvSource(three_files).open(Assignment(), resume)


def test_commit_and_rollback(three_files, monkeypatch):
    monkeypatch.setattr(csv_source, "MAX_BATCH", 5)
    source = CsvSource(three_files)
    assignment = Assignment()
    source.open(assignment, {})
    assert assignment.calls == [("assigned", [0])]
    first = source.poll(0.0)
    source.commit()
    committed = source.positions()
    lost = source.poll(0.0) + source.poll(0.0)
    assert source.rollback() == [0]
    assert source.positions() == committed
    again = source.poll(0.0) + source.poll(0.0)
    assert rows_of(again) == rows_of(lost) and [m.position for m in again] == [m.position for m in lost]
    assert first[-1].position + 1 == again[0].position
    assert source.rollback() == [0]  # nothing committed since: back to the same point
    assert rows_of(source.poll(0.0)) == rows_of(lost[:5])
    source.close()


def test_rollback_before_any_commit_goes_back_to_the_resumed_point(three_files):
    resume = {"rows": {str(three_files[1]): 4}}
    source = opened(CsvSource(three_files), resume)
    first = drain(source)
    assert source.rollback() == [0]
    assert source.positions()["rows"][str(three_files[1])] == 4
    assert rows_of(drain(source)) == rows_of(first) and len(first) == 61 - 4


# ---- pace ------------------------------------------------------------------------------------------
def test_real_pace_with_a_speed_factor(tmp_path):
    path = write_csv(tmp_path / "paced.csv", [[f"2014-04-01 00:00:{s:02d}", s] for s in range(0, 21, 2)])
    source = opened(CsvSource([path], speed=20.0))  # 20 s of data in 1 s
    arrivals: list[float] = []
    start = time.monotonic()
    while not source.exhausted:
        got = source.poll(0.005)
        arrivals.extend(time.monotonic() - start for _ in got)
        assert time.monotonic() - start < 10
    assert len(arrivals) == 11
    assert arrivals[0] < 0.05 and 0.9 <= arrivals[-1] <= 1.6
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert all(0.05 <= g <= 0.3 for g in gaps), gaps  # about 0.1 s each


def test_poll_waits_at_most_its_timeout(tmp_path):
    path = write_csv(tmp_path / "slow.csv", [[0, 1], [3600, 2]])
    source = opened(CsvSource([path], speed=1.0))
    assert len(source.poll(0.01)) == 1
    start = time.monotonic()
    assert source.poll(0.05) == []
    assert 0.04 <= time.monotonic() - start < 0.5
    assert not source.exhausted
    source.close()


def test_backwards_steps_are_not_slept(tmp_path):
    a = write_csv(tmp_path / "a.csv", [[100, 1], [50, 2], [51, 3]])
    source = opened(CsvSource([a], speed=10.0))
    start = time.monotonic()
    messages = drain(source)
    assert len(messages) == 3 and 0.05 <= time.monotonic() - start < 0.6  # only the 1 s gap, at 10x


def test_nab_at_a_large_speed_factor(nab_file):
    source = opened(CsvSource([nab_file], speed=36_000.0))  # hourly rows: 0.1 s apart
    start = time.monotonic()
    got: list[Message] = []
    while len(got) < 11:
        got.extend(source.poll(0.005))
    assert 0.9 <= time.monotonic() - start <= 1.8
    source.close()


def test_bad_speed(tmp_path):
    path = write_csv(tmp_path / "a.csv", [[1, 1]])
    for speed in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="speed"):
            CsvSource([path], speed=speed)


# ---- junk files ------------------------------------------------------------------------------------
def refusals(messages: list[Message], decoder: ReadingDecoder | None = None) -> list[str]:
    """The decoder's verdict on each message: ``ok`` or the ``DecodeError`` kind (nothing else raised)."""
    decoder = decoder or ReadingDecoder()
    kinds = []
    for m in messages:
        try:
            decoder.decode(m)
            kinds.append("ok")
        except DecodeError as exc:
            assert "undecodable" not in str(exc)
            kinds.append(exc.kind)
    return kinds


def test_ragged_rows(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("timestamp,value\n1,2\n2\n3,4,5\n\n4,6\n")
    messages = drain(opened(CsvSource([path])))
    assert [m.payload for m in messages] == [
        {"timestamp": "1", "value": "2"},
        {"timestamp": "2"},  # a missing field is an absent key
        {"timestamp": "3", "value": "4", None: ["5"]},  # extra fields under None, as csv.DictReader
        {"timestamp": "4", "value": "6"},  # the blank line is skipped
    ]
    assert refusals(messages) == ["ok", "missing_value", "malformed", "ok"]


def test_empty_and_header_only_files(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    header = tmp_path / "header.csv"
    header.write_text("timestamp,value\n")
    good = write_csv(tmp_path / "good.csv", [[1, 1]])
    source = opened(CsvSource([empty, header, good]))
    messages = drain(source)
    assert [m.key for m in messages] == ["good"]
    assert source.positions()["rows"] == {str(empty): 0, str(header): 0, str(good): 1}


def test_binary_junk_nul_bytes_and_invalid_utf8(tmp_path):
    rng_bytes = bytes((i * 131 + 17) % 256 for i in range(20_000))
    junk = tmp_path / "junk.csv"
    junk.write_bytes(rng_bytes)
    nul = tmp_path / "nul.csv"
    nul.write_bytes(b"timestamp,value\n1,\x002\n\x00\x00\x00\n2,3\n")
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"timestamp,value\n1,3\xe9\n\xff\xfe,1\n2,4\n")
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbftimestamp,value\n1,5\n")
    quote = tmp_path / "quote.csv"
    quote.write_text('timestamp,value\n1,"unterminated\n2,3\n')
    source = opened(CsvSource([junk, nul, latin, bom, quote]))
    messages = drain(source)
    by_file = {p.stem: [m for m in messages if m.key == p.stem] for p in (junk, nul, latin, bom, quote)}
    assert set(refusals(by_file["junk"])) - {"ok"}  # refused, whatever it decodes to
    assert refusals(by_file["nul"]) == ["non_numeric", "bad_timestamp", "ok"]
    assert refusals(by_file["latin"]) == ["non_numeric", "bad_timestamp", "ok"]
    assert by_file["latin"][0].payload["value"] == "3\ufffd"
    assert by_file["bom"][0].payload == {"timestamp": "1", "value": "5"}  # the byte-order mark is dropped
    assert refusals(by_file["quote"]) == ["non_numeric"]


def test_overlong_lines_and_fields(tmp_path):
    path = tmp_path / "long.csv"
    with open(path, "w") as f:
        f.write("timestamp,value\n1,1\n")
        f.write("2," + "9" * (csv_source.MAX_LINE + 10) + "\n")  # a line over MAX_LINE
        f.write('3,"' + "8" * 200_000 + '"\n')  # a field over the csv module's limit
        f.write("4,4\n")
    messages = drain(opened(CsvSource([path])))
    assert refusals(messages) == ["ok", "malformed", "malformed", "ok"]
    assert "longer than" in messages[1].payload[None] and "field" in messages[2].payload[None]
    assert [m.payload.get("timestamp") for m in (messages[0], messages[3])] == ["1", "4"]


def test_unreadable_header(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text('"' + "h" * 200_000 + '",value\n1,2\n3,4\n')
    source = opened(CsvSource([path, write_csv(tmp_path / "good.csv", [[2, 1]])]))
    messages = drain(source)
    assert [m.key for m in messages] == ["header", "good"]  # one message for the file, then it is done
    assert messages[0].payload[None].startswith("csv: unreadable header")
    assert refusals(messages) == ["malformed", "ok"]
    assert source.positions()["rows"][str(path)] == 1


def test_unreadable_files_raise_at_open(tmp_path):
    good = write_csv(tmp_path / "good.csv", [[1, 1]])
    with pytest.raises(OSError, match=r"missing\.csv"):
        CsvSource([good, tmp_path / "missing.csv"]).open(Assignment(), {})
    with pytest.raises(OSError, match="cannot"):
        CsvSource([tmp_path]).open(Assignment(), {})
    if os.geteuid() != 0:
        locked = write_csv(tmp_path / "locked.csv", [[1, 1]])
        locked.chmod(0)
        with pytest.raises(OSError, match=r"locked\.csv"):
            CsvSource([locked]).open(Assignment(), {})


def test_bad_file_lists(tmp_path):
    a = write_csv(tmp_path / "a.csv", [[1, 1]])
    (tmp_path / "x").mkdir()
    other_a = write_csv(tmp_path / "x" / "a.csv", [[1, 1]])
    with pytest.raises(ValueError, match="no files"):
        CsvSource([])
    with pytest.raises(ValueError, match="twice"):
        CsvSource([a, str(a)])
    with pytest.raises(ValueError, match="share a name"):
        CsvSource([a, other_a])
    assert len(drain(opened(CsvSource([a, other_a], stream_column="sensor")))) == 2


def test_close_is_idempotent_and_exhausted_only_after_open(tmp_path):
    a = write_csv(tmp_path / "a.csv", [[1, 1]])
    source = CsvSource([a])
    assert not source.exhausted and source.poll(0.0) == []
    source.open(Assignment(), {})
    source.close()
    source.close()


# ---- through the pipeline --------------------------------------------------------------------------
def test_pipeline_replays_csv_files_and_resumes_after_the_last_checkpoint(ref_factory, tmp_path):
    """CSV files → ``ReadingDecoder`` → engine → JSON lines, junk rows → dead letters; a second run from
    the same checkpoint directory resumes after the rows already answered."""
    from connectors.files import JsonLinesDeadLetters, JsonLinesSink
    from engine import Engine
    from rnnstream.checkpoint import LocalCheckpoint
    from rnnstream.pipeline import Pipeline

    ref = ref_factory("gru", input_size=1, hidden_size=4, head_out=1)
    data = tmp_path / "data"
    data.mkdir()
    a = write_csv(data / "a.csv", [[t, t / 10] for t in range(0, 40, 2)] + [[41, "nan"], [42, "x"]])
    b = write_csv(data / "b.csv", [[t, -t] for t in range(1, 40, 3)] + [["never", 1]])
    out, dead, state = tmp_path / "out.jsonl", tmp_path / "dead.jsonl", tmp_path / "state"

    def run(paths: list[Path]) -> None:
        engine = Engine(ref.model, device="cpu", freeze_gc=False)
        pipe = Pipeline(
            engine,
            CsvSource(paths),
            ReadingDecoder(),
            JsonLinesSink(out),
            JsonLinesDeadLetters(dead),
            LocalCheckpoint(state),
            checkpoint_interval_s=0.0,
        )
        pipe.run()

    run([a, b])
    outputs = [json.loads(line) for line in out.read_text().splitlines()]
    letters = [json.loads(line) for line in dead.read_text().splitlines()]
    assert len(outputs) == 20 + 13 and {o["stream"] for o in outputs} == {"a", "b"}
    assert [o["offset"] for o in outputs] == sorted(o["offset"] for o in outputs)
    assert sorted(d["raw"]["value"] for d in letters) == ["1", "nan", "x"]
    assert {d["topic"] for d in letters} == {str(a), str(b)}

    with open(a, "a") as f:  # more rows arrive in a file; a restart replays only those
        f.write("50,5.0\n51,5.1\n")
    run([a, b])
    more = [json.loads(line) for line in out.read_text().splitlines()][len(outputs) :]
    assert [(o["stream"], o["offset"]) for o in more] == [("a", 36), ("a", 37)]
