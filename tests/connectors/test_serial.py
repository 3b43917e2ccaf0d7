"""``SerialSource`` over real pseudo-terminals: the test writes to a pty's master, the source reads the
slave through pyserial, as it would read a USB serial adapter. Reopening uses a ``socat`` pty pair, which
can be killed and started again under the same link names (an unplugged and replugged device)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import pytest

from connectors.base import Message, Source
from connectors.codec import Decoded, DecodeError
from connectors.serial import FlaggedLineDecoder, Line, LineFramer, SerialSource, garbage


class Recorder:
    """An ``Assignment`` that records what it is told."""

    def __init__(self) -> None:
        self.assigned_partitions: list[list[int]] = []

    def assigned(self, partitions: list[int]) -> None:
        self.assigned_partitions.append(partitions)

    def revoked(self, partitions: list[int]) -> None:
        raise AssertionError("a serial source never revokes")


class PayloadDecoder:
    """Stands for the pipeline's decoder: accepts anything."""

    def decode(self, message: Message) -> Decoded:
        return Decoded([message.payload])


def wait_until(condition: Callable[[], object], timeout_s: float = 3.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or condition}")
        time.sleep(0.01)


def collect(source: SerialSource, n: int, timeout_s: float = 3.0) -> list[Message]:
    """Poll until ``n`` messages arrived (fails on more, or on fewer after ``timeout_s`` seconds)."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        got += source.poll(0.05)
    got += source.poll(0.05)  # nothing more may come
    assert len(got) == n, [m.payload for m in got]
    return got


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@pytest.fixture
def pty() -> Iterator[tuple[int, str]]:
    """``(master fd, slave path)`` of a fresh pseudo-terminal; the slave fd stays open meanwhile."""
    master, slave = os.openpty()
    path = os.ttyname(slave)
    yield master, path
    for fd in (master, slave):
        with contextlib.suppress(OSError):
            os.close(fd)


@pytest.fixture
def open_source() -> Iterator[Callable[..., SerialSource]]:
    """Opens ``SerialSource(port, **kwargs)``, waits until the port is open (pyserial flushes the input
    buffer when it opens a port, so bytes written earlier would be lost), and closes it afterwards,
    checking that closing is prompt."""
    sources: list[SerialSource] = []

    def make(port: str, wait: bool = True, **kwargs) -> SerialSource:
        source = SerialSource(port, **kwargs)
        recorder = Recorder()
        source.open(recorder, {})
        sources.append(source)
        assert recorder.assigned_partitions == [[0]]
        if wait:
            wait_until(lambda: source.connected, what="the port to open")
        return source

    yield make
    for source in sources:
        started = time.monotonic()
        source.close()
        assert time.monotonic() - started < 1.0
        assert source._thread is None or not source._thread.is_alive()


# ---- framing -----------------------------------------------------------------------------------------
def test_lines_in_both_protocols_arrive_in_order(pty, open_source) -> None:
    master, port = pty
    source = open_source(port, stream_id="boiler-3")
    assert isinstance(source, Source) and source.guarantee == "best-effort"
    lines = []
    for i in range(60):
        ts = 1_700_000_000 + i / 10
        lines.append(f"{ts},{i}.5,-{i}" if i % 2 else f'{{"ts": {ts}, "x": [{i}.5, -{i}]}}')
    write_all(master, "".join(line + "\n" for line in lines).encode())
    messages = collect(source, len(lines))
    assert [m.payload for m in messages] == [line.encode() for line in lines]
    assert [m.position for m in messages] == list(range(len(lines)))
    assert {(m.key, m.partition, m.topic, m.feedback) for m in messages} == {("boiler-3", 0, port, False)}
    assert all(isinstance(m.payload, bytes) for m in messages)
    assert all(a.received <= b.received <= time.monotonic() for a, b in itertools.pairwise(messages))
    counts = source.counters()
    assert counts["lines"] == len(lines) and counts["bytes"] == sum(len(x) + 1 for x in lines)
    problems = ("partial_lines", "oversized_lines", "garbage_lines", "dropped_lines", "disconnects")
    assert all(counts[k] == 0 for k in problems), counts
    assert not source.exhausted and source.positions() == {} and source.rollback() == [0]
    source.commit()


def test_crlf_and_one_byte_writes_frame_correctly(pty, open_source) -> None:
    master, port = pty
    source = open_source(port)
    data = b'1700000000.5,21.25\r\n{"ts": 1700000001, "x": [1.5]}\r\n\r\n1700000002,\xc2\xb0\t3\n'
    for i in range(len(data)):
        os.write(master, data[i : i + 1])
        time.sleep(0.002)
    messages = collect(source, 3)
    assert [m.payload for m in messages] == [
        b"1700000000.5,21.25",
        b'{"ts": 1700000001, "x": [1.5]}',
        b"1700000002,\xc2\xb0\t3",  # UTF-8 text and a tab are fine
    ]
    assert [m.position for m in messages] == [0, 1, 2]
    assert all(m.key == port for m in messages)  # no stream id: the port names the stream
    counts = source.counters()
    assert counts["empty_lines"] == 1  # the bare CRLF: no reading, no position
    assert counts["partial_lines"] == counts["garbage_lines"] == counts["oversized_lines"] == 0


def test_partial_line_after_silence_is_emitted_and_counted(pty, open_source) -> None:
    master, port = pty
    source = open_source(port, line_timeout_s=0.2)
    write_all(master, b"1700000000,1.5\n1700000001,2.")
    started = time.monotonic()
    first = collect(source, 1)
    assert first[0].payload == b"1700000000,1.5"
    [partial] = collect(source, 1, timeout_s=2.0)
    assert time.monotonic() - started >= 0.2
    assert partial.payload == b"1700000001,2." and partial.position == 1
    assert source.counters()["partial_lines"] == 1
    assert "partial line" in source.line_problem(1) and source.line_problem(0) is None
    write_all(master, b"1700000002,3.5\n")
    [after] = collect(source, 1)
    assert (after.payload, after.position) == (b"1700000002,3.5", 2)
    assert source.line_problem(2) is None and source.counters()["partial_lines"] == 1
    decoder = FlaggedLineDecoder(source, PayloadDecoder())  # "1700000001,2." would parse: refuse it
    assert [decoder.decode(m).xs for m in (*first, after)] == [[b"1700000000,1.5"], [b"1700000002,3.5"]]
    with pytest.raises(DecodeError, match="partial line") as refused:
        decoder.decode(partial)
    assert refused.value.kind == "partial"


def test_slow_line_is_not_partial(pty, open_source) -> None:
    """``line_timeout_s`` is silence, not the time a line takes: a line trickling in byte by byte for
    longer than the timeout (with reads timing out between the bytes) is whole."""
    master, port = pty
    source = open_source(port, line_timeout_s=0.1)
    for b in b"1700,1.25\n":
        os.write(master, bytes([b]))
        time.sleep(0.06)  # 10 bytes x 60 ms = 0.6 s > line_timeout_s > 60 ms
    [message] = collect(source, 1)
    assert message.payload == b"1700,1.25" and source.counters()["partial_lines"] == 0


def test_garbage_bytes_are_counted_and_emitted(pty, open_source) -> None:
    master, port = pty
    source = open_source(port)
    lines = [
        b"1700000000,1.5",
        b"1700000001,\x002.5",  # NUL
        b"17000000\xff\xfe02,3.5",  # not UTF-8
        b"\x1b[0m1700000003,4.5",  # an escape sequence
        b"1700000004,\xc2\x855.5",  # C1 control (NEL) encoded as UTF-8
        b'{"ts": 1700000005, "x": [6.5], "unit": "\xc2\xb0C"}',  # UTF-8 text: fine
    ]
    write_all(master, b"\n".join(lines) + b"\n")
    messages = collect(source, len(lines))
    assert [m.payload for m in messages] == lines  # emitted unchanged: the decoder rejects them
    assert source.counters()["garbage_lines"] == 4
    flagged = [source.line_problem(m.position) for m in messages]
    assert [p is not None for p in flagged] == [False, True, True, True, True, False]
    assert "U+0000" in flagged[1] and "not UTF-8" in flagged[2] and "U+001B" in flagged[3]
    with pytest.raises(DecodeError, match="garbage bytes") as refused:
        FlaggedLineDecoder(source, PayloadDecoder()).decode(messages[3])
    assert refused.value.kind == "garbage"


def test_oversized_line_is_cut_counted_and_the_next_line_is_fine(pty, open_source) -> None:
    master, port = pty
    source = open_source(port, max_line_bytes=64)
    exact = b"1700000000," + b"1" * 53  # 64 bytes: the most a line may hold, even with a CRLF
    long = b"1700000001," + b"2.5," * 100
    write_all(master, exact + b"\r\n" + long[:150])
    time.sleep(0.05)
    degrees = b"1700000003," + "°".encode() * 40  # cut at 64 bytes: inside a 2-byte character
    write_all(master, long[150:] + b"\r\n1700000002,3.5\n" + b"x" * 65 + b"\n" + degrees + b"\n")
    messages = collect(source, 5)
    assert [m.payload for m in messages] == [exact, long[:64], b"1700000002,3.5", b"x" * 64, degrees[:64]]
    assert [m.position for m in messages] == [0, 1, 2, 3, 4]
    counts = source.counters()  # a character cut in two by the truncation is not garbage
    assert counts["oversized_lines"] == 3 and counts["partial_lines"] == 0 and counts["garbage_lines"] == 0
    assert "oversized" in source.line_problem(1) and source.line_problem(2) is None
    with pytest.raises(DecodeError, match="oversized line") as refused:
        FlaggedLineDecoder(source, PayloadDecoder()).decode(messages[1])
    assert refused.value.kind == "oversized"


def test_falling_behind_drops_the_oldest_lines_and_counts_them(pty, open_source) -> None:
    master, port = pty
    source = open_source(port, max_queued_lines=5)
    write_all(master, b"".join(b"1700000000,%d\n" % i for i in range(20)))
    wait_until(lambda: source.counters()["lines"] == 20, what="20 lines")
    messages = source.poll(0.1)
    assert [m.position for m in messages] == list(range(15, 20))  # the newest, numbered as read
    assert messages[0].payload == b"1700000000,15"
    assert source.counters()["dropped_lines"] == 15


# ---- a wrong baud rate -------------------------------------------------------------------------------
def uart_receive(data: bytes, sent_baud: int, read_baud: int) -> bytes:
    """The bytes a UART reading at ``read_baud`` gets from a line driven at ``sent_baud`` with ``data``
    (8N1: idle high, a start bit 0, 8 data bits LSB first, a stop bit 1).

    The receiver waits for a falling edge (a start bit), samples the 8 data bits in the middle of its own
    bit times and checks the stop bit; a low stop bit is a framing error, delivered as NUL as Linux does
    without ``IGNPAR``/``PARMRK``; then it waits for the next falling edge. Times are exact fractions
    of the sender's bit time."""
    bits = [1, 1]
    for byte in data:
        bits += [0, *((byte >> i) & 1 for i in range(8)), 1]
    bits += [1, 1]
    ratio = Fraction(sent_baud, read_baud)  # sender bit times per receiver bit time

    def level(t: Fraction) -> int:
        return bits[int(t)] if t < len(bits) else 1

    out = bytearray()
    k = 1
    while k < len(bits):
        if bits[k - 1] == 0 or bits[k] == 1:
            k += 1
            continue
        byte = sum(level(k + (i + Fraction(3, 2)) * ratio) << i for i in range(8))
        stop_at = k + Fraction(19, 2) * ratio
        out.append(byte if level(stop_at) else 0)
        k = int(stop_at) + 1
    return bytes(out)


READINGS = b"".join(b"1700000000.%d,%d.5,-2.25\n" % (i, i) for i in range(40))


def test_uart_simulation_is_identity_at_the_right_rate() -> None:
    assert uart_receive(READINGS, 9600, 9600) == READINGS
    assert uart_receive(READINGS, 115200, 115200) == READINGS
    assert uart_receive(READINGS, 9600, 115200) != READINGS


@pytest.mark.parametrize(("sent_baud", "read_baud"), [(9600, 115200), (115200, 9600), (19200, 9600)])
def test_wrong_baud_rate_shows_as_counted_garbage_then_lines_recover(
    pty, open_source, sent_baud: int, read_baud: int
) -> None:
    """A pty has no baud rate (``termios`` speeds on it change nothing), so a wrong rate cannot happen
    on it. What a UART would deliver is simulated instead: real readings go through ``uart_receive``,
    which re-samples their 8N1 bit stream at the wrong rate, and those bytes are written to the pty. A
    device at 9600 read at 115200 gives NULs (framing errors); read slower, bytes from bits of several
    characters, with control bytes and almost never a newline. Then the device is set right: its
    readings must come through intact."""
    master, port = pty
    source = open_source(port, baudrate=read_baud, max_line_bytes=256, line_timeout_s=0.2)
    noise = uart_receive(READINGS, sent_baud, read_baud)
    assert noise and noise != READINGS
    write_all(master, noise)
    wait_until(lambda: source.counters()["bytes"] == len(noise), what="the noise")
    time.sleep(0.3)  # the noise ends without a terminator: a partial line after line_timeout_s
    garbled = source.poll(0.5)
    assert garbled, "the noise must reach the pipeline"
    assert all("garbage bytes" in (source.line_problem(m.position) or "") for m in garbled)
    counts = source.counters()
    assert counts["garbage_lines"] == len(garbled)
    assert counts["partial_lines"] + counts["oversized_lines"] >= 1
    write_all(master, READINGS)
    good = collect(source, 40)
    assert [m.payload + b"\n" for m in good] == READINGS.splitlines(keepends=True)
    assert all(source.line_problem(m.position) is None for m in good)
    assert source.counters()["garbage_lines"] == len(garbled) and source.counters()["disconnects"] == 0


# ---- the port going away -----------------------------------------------------------------------------
def test_pty_closing_is_a_counted_disconnect_logged_once(pty, open_source, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="connectors.serial")
    master, port = pty
    source = open_source(port, line_timeout_s=5.0, reopen_backoff_s=(0.02, 2.0))
    write_all(master, b"1700000000,1.5\n1700000001,2")
    wait_until(lambda: source.counters()["bytes"] == 27, what="the bytes")
    os.close(master)  # the device goes away mid-line
    wait_until(lambda: source.counters()["disconnects"] == 1, what="the disconnect")
    messages = collect(source, 2)
    assert [m.payload for m in messages] == [b"1700000000,1.5", b"1700000001,2"]
    assert "port closed mid-line" in source.line_problem(1) and source.counters()["partial_lines"] == 1
    time.sleep(0.5)  # several failed reopens (0.02, 0.04, 0.08, 0.16 s apart)
    assert source.poll(0.01) == [] and not source.connected
    counts = source.counters()
    assert counts["disconnects"] == 1 and counts["open_errors"] >= 3 and counts["reopens"] == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "disconnected" in errors[0].getMessage(), [r.getMessage() for r in errors]


def test_absent_port_is_retried_and_close_is_prompt_during_backoff(tmp_path, open_source, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="connectors.serial")
    source = open_source(str(tmp_path / "ttyUSB9"), wait=False, reopen_backoff_s=(5.0, 5.0))
    assert not source.connected and source.poll(0.05) == []
    assert source.counters()["open_errors"] == 1
    assert ["cannot be opened" in r.getMessage() for r in caplog.records] == [True]
    with pytest.raises(ValueError):  # a bad URL is a configuration error, not a missing device
        SerialSource("nonsense://x").open(Recorder(), {})


def test_close_is_prompt_while_reading(pty, open_source) -> None:
    master, port = pty
    source = open_source(port, line_timeout_s=10.0)
    write_all(master, b"1700000000,1")  # a line in progress
    wait_until(lambda: source.counters()["bytes"] == 12)
    started = time.monotonic()
    source.close()
    assert time.monotonic() - started < 0.5
    assert not source.connected and not source._thread.is_alive()


class SocatPair:
    """Two linked ptys from ``socat``, reachable as ``device`` (read by the source) and ``host`` (written
    by the test); ``stop`` and ``start`` again: the same paths, new ptys (a replugged device)."""

    def __init__(self, tmp_path: Path) -> None:
        self.device = str(tmp_path / "ttyDEV")
        self.host = str(tmp_path / "ttyHOST")
        self.proc: subprocess.Popen | None = None
        self.fd: int | None = None

    def start(self) -> None:
        pty = "pty,raw,echo=0,link={}"
        self.proc = subprocess.Popen(
            ["socat", pty.format(self.device), pty.format(self.host)], stderr=subprocess.DEVNULL
        )
        wait_until(lambda: os.path.exists(self.device) and os.path.exists(self.host), what="socat's ptys")
        self.fd = os.open(self.host, os.O_RDWR | os.O_NOCTTY)  # kept open: socat exits when it closes

    def write(self, data: bytes) -> None:
        assert self.fd is not None
        write_all(self.fd, data)

    def stop(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)  # socat removes its links on SIGTERM
            self.proc.wait(timeout=5)
            self.proc = None


@pytest.fixture
def socat(tmp_path) -> Iterator[SocatPair]:
    if shutil.which("socat") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("socat not found (CI=true: scripts/system_deps.sh installs it)")
        pytest.skip("socat not found (scripts/system_deps.sh installs it)")
    pair = SocatPair(tmp_path)
    pair.start()
    yield pair
    pair.stop()


def test_port_coming_back_is_reopened_and_lines_flow_again(socat, open_source, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="connectors.serial")
    source = open_source(socat.device, stream_id="s1", reopen_backoff_s=(0.05, 0.4))
    socat.write(b"1700000000,1.5\n1700000001,2.5\n")
    assert [m.payload for m in collect(source, 2)] == [b"1700000000,1.5", b"1700000001,2.5"]
    socat.stop()  # unplugged
    wait_until(lambda: source.counters()["disconnects"] == 1, what="the disconnect")
    time.sleep(0.3)  # a few failed reopens
    assert source.poll(0.01) == [] and source.counters()["open_errors"] >= 1
    socat.start()  # plugged in again: new ptys under the same names
    wait_until(lambda: source.counters()["reopens"] == 1, timeout_s=3.0, what="the reopen")
    socat.write(b"1700000002,3.5\n1700000003,4.5\n")
    messages = collect(source, 2)
    assert [(m.payload, m.position, m.key) for m in messages] == [
        (b"1700000002,3.5", 2, "s1"),
        (b"1700000003,4.5", 3, "s1"),
    ]
    counts = source.counters()
    assert counts["disconnects"] == 1 and counts["reopens"] == 1 and counts["partial_lines"] == 0
    logged = [r.getMessage() for r in caplog.records]
    assert sum("disconnected" in m for m in logged) == 1 and sum("is back" in m for m in logged) == 1


# ---- pure parts --------------------------------------------------------------------------------------
def test_framer_and_garbage_rules() -> None:
    framer = LineFramer(8)
    lines = framer.feed(b"ab\r\ncd\n\nef")
    assert [(x.payload, x.partial, x.oversized) for x in lines] == [
        (b"ab", None, False),
        (b"cd", None, False),
        (b"", None, False),  # the source skips (and counts) empty lines
    ]
    assert framer.active
    [cut] = framer.feed(b"ghijklmn")  # 10 bytes, no terminator: too long even if a CR came next
    assert (cut.payload, cut.oversized) == (b"efghijkl", True)
    assert framer.feed(b"more tail") == [] and framer.active  # the rest of that line: discarded
    assert framer.feed(b"\nok\n") == [Line(b"ok")]
    assert framer.flush("silence") is None and not framer.active
    framer.feed(b"12,3")
    line = framer.flush("silence")
    assert (line.payload, line.partial, line.oversized) == (b"12,3", "silence", False)
    assert garbage(b"12,\xc2\xb0\t3\r") is None
    assert garbage(b"12,\xc2", complete=False) is None  # cut inside a UTF-8 sequence: not garbage
    assert "not UTF-8" in garbage(b"12,\xc2") and "U+007F" in garbage(b"1\x7f")
