"""Per-stream order across every entry point: what a thread asks of a stream happens in the order it asked,
whether it went through ``submit``, ``submit_async``, ``step_many``, ``submit_many``, a control,
``release``, ``restore`` or ``snapshot``."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Engine, EngineSnapshot, UnknownStreamError

ATOL = 1e-5


def test_step_many_does_not_overtake_queued_submits(ref_factory):
    ref = ref_factory("gru", hidden_size=5)
    xs = ref.random_inputs(np.random.default_rng(0), 3)
    with Engine(ref.model, device="cpu") as engine:
        with engine._lock:  # the step loop cannot take the queued event before step_many is called
            first = engine.submit("s", xs[0])
            rest = engine.step_many(["s", "s"], xs[1:])
        np.testing.assert_allclose(first.result(timeout=10), ref.run(xs)[0], atol=ATOL)
        np.testing.assert_allclose(rest, ref.run(xs)[1:], atol=ATOL)


def test_release_restore_and_snapshot_come_after_queued_events(ref_factory):
    ref = ref_factory("gru", hidden_size=5)
    xs = ref.random_inputs(np.random.default_rng(1), 4)
    with Engine(ref.model, device="cpu") as engine:
        with engine._lock:
            engine.submit("gone", xs[0])
            engine.release(["gone"])
        assert "gone" not in engine  # the queued event ran first; release then forgot the stream
        with engine._lock:
            engine.submit("s", xs[0])
            snap = engine.snapshot(stream_ids=["s"])
        assert snap.stream_ids == ["s"]
        np.testing.assert_allclose(snap.states[0][0].numpy(), ref.run(xs[:1])[0], atol=ATOL)
        with engine._lock:
            engine.submit("s", xs[1])
            engine.restore(snap, replace=False)  # back to the state after xs[0]
        np.testing.assert_allclose(engine.step_many(["s"], xs[2:3]), ref.run(xs[[0, 2]])[1:], atol=ATOL)


# ---- the property: random programs from several threads against a sequential reference ---------------
OPS = [
    "submit",
    "submit",
    "submit",
    "async",
    "many",
    "smany",
    "start",
    "reset",
    "end",
    "release",
    "snap",
    "restore",
]
STREAMS_PER_THREAD = 2


@dataclass
class Reference:
    """One thread's streams as the inputs each has seen since its (re)start; None: the engine holds none."""

    seqs: dict[str, tuple[int, ...] | None]
    saved: list[tuple[EngineSnapshot, dict[str, tuple[int, ...] | None]]] = field(default_factory=list)


class Program:
    """Runs one thread's operations and checks each result against the reference model."""

    def __init__(self, engine: Engine, ref, inputs: np.ndarray, thread: int) -> None:
        self.engine, self.ref, self.inputs = engine, ref, inputs
        self.ids = [f"t{thread}s{i}" for i in range(STREAMS_PER_THREAD)]
        self.model = Reference(dict.fromkeys(self.ids))
        self.pending: list[tuple[Future, np.ndarray]] = []
        self.cursor = 0

    def expected_after(self, sid: str) -> np.ndarray:
        return self.ref.run(self.inputs[list(self.model.seqs[sid] or ())])[-1]

    def _event(self, sid: str) -> np.ndarray:
        k = self.cursor % len(self.inputs)
        self.cursor += 1
        self.model.seqs[sid] = (*(self.model.seqs[sid] or ()), k)
        return self.inputs[k]

    def run(self, op: str, i: int, n: int) -> None:
        sid, engine, seqs = self.ids[i], self.engine, self.model.seqs
        if op == "submit":
            x = self._event(sid)
            self.pending.append((engine.submit(sid, x), self.expected_after(sid)))
        elif op == "async":
            x = self._event(sid)
            got = asyncio.run(engine.submit_async(sid, x))
            np.testing.assert_allclose(got, self.expected_after(sid), atol=ATOL)
        elif op in ("many", "smany"):
            ids = [self.ids[(i + j) % STREAMS_PER_THREAD] for j in range(n)]
            xs, want = [], []
            for s in ids:
                xs.append(self._event(s))
                want.append(self.expected_after(s))
            if op == "many":
                np.testing.assert_allclose(engine.step_many(ids, np.stack(xs)), np.stack(want), atol=ATOL)
            else:  # queued: checked at the end, like submit's futures
                self.pending.append((engine.submit_many(ids, np.stack(xs)), np.stack(want)))
        elif op == "start":
            engine.start(sid)
            seqs[sid] = ()
        elif op in ("reset", "end"):
            self._reset_or_end(op, sid)
        elif op == "release":
            engine.release([sid])
            seqs[sid] = None
        elif op == "snap":
            snap = engine.snapshot(stream_ids=self.ids)
            assert sorted(snap.stream_ids) == sorted(s for s in self.ids if seqs[s] is not None)
            self.model.saved.append((snap, dict(seqs)))
        elif op == "restore" and self.model.saved:
            snap, then = self.model.saved[n % len(self.model.saved)]
            engine.restore(snap, replace=False)
            seqs.update({s: then[s] for s in snap.stream_ids})

    def _reset_or_end(self, op: str, sid: str) -> None:
        seqs = self.model.seqs
        if seqs[sid] is None:
            with pytest.raises(UnknownStreamError):
                getattr(self.engine, op)(sid)
            return
        if op == "reset":
            self.engine.reset(sid)
            seqs[sid] = ()
            return
        final = self.engine.end(sid)
        if seqs[sid]:  # the head on its last hidden state: the last output of its sequence
            np.testing.assert_allclose(final, self.expected_after(sid), atol=ATOL)
        seqs[sid] = None

    def check_pending(self) -> None:
        for future, want in self.pending:
            np.testing.assert_allclose(future.result(timeout=30), want, atol=ATOL)


program_st = st.lists(
    st.tuples(st.sampled_from(OPS), st.integers(0, STREAMS_PER_THREAD - 1), st.integers(1, 4)),
    min_size=1,
    max_size=25,
)


@pytest.fixture(scope="module")
def order_ref(ref_factory):
    return ref_factory("gru", input_size=3, hidden_size=6, num_layers=2, head_out=2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    programs=st.lists(program_st, min_size=2, max_size=3),
    max_batch=st.sampled_from([1, 3, 64]),
    page_rows=st.sampled_from([2, 16_384]),  # 2: streams spread over pages, moved when pages are freed
)
def test_every_entry_point_keeps_per_stream_order(order_ref, programs, max_batch, page_rows):
    inputs = order_ref.random_inputs(np.random.default_rng(7), 16)
    with Engine(
        order_ref.model, device="cpu", max_batch=max_batch, capacity=1, page_rows=page_rows
    ) as engine:
        runners = [Program(engine, order_ref, inputs, t) for t in range(len(programs))]
        errors: list[BaseException] = []
        barrier = threading.Barrier(len(programs))

        def run(runner: Program, ops: list[tuple[str, int, int]]) -> None:
            try:
                barrier.wait()
                for op, i, n in ops:
                    runner.run(op, i, n)
                runner.check_pending()
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=pair) for pair in zip(runners, programs, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise errors[0]
