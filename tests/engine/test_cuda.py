"""The same engine on CUDA: identical results to the torch module, states stay on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import Engine, EngineSnapshot

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
ATOL = 1e-5


@pytest.mark.parametrize("kind", ["rnn_tanh", "gru", "lstm"])
def test_cuda_matches_cpu_reference(ref_factory, kind):
    ref = ref_factory(kind, num_layers=2, hidden_size=32, head_out=3)
    rng = np.random.default_rng(0)
    seqs = {i: ref.random_inputs(rng, 20) for i in range(50)}
    ids = [i for i in seqs for _ in range(20)]
    rng.shuffle(ids)
    cursor = dict.fromkeys(seqs, 0)
    xs = []
    for i in ids:
        xs.append(seqs[i][cursor[i]])
        cursor[i] += 1
    with Engine(ref.model, device="auto") as engine:
        assert engine.device.type == "cuda"
        assert all(t.is_cuda for t in engine._store.tensors)
        half = len(ids) // 2
        out = np.concatenate(
            [
                engine.step_many(ids[:half], np.stack(xs[:half])),
                np.stack([engine.submit(i, x).result() for i, x in zip(ids[half:], xs[half:], strict=True)]),
            ]
        )
        snap = engine.snapshot()
    got = {i: [] for i in seqs}
    for i, row in zip(ids, out, strict=True):
        got[i].append(row)
    for i, seq in seqs.items():
        np.testing.assert_allclose(np.stack(got[i]), ref.run(seq), atol=ATOL, rtol=ATOL)
    with Engine(ref.model.cpu(), device="cpu") as cpu_engine:  # a CUDA snapshot restores on CPU
        cpu_engine.restore(EngineSnapshot(snap.stream_ids, snap.states, model_spec=snap.model_spec))
        assert cpu_engine.active_streams == 50
