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


def test_cuda_weight_swap_keeps_states_and_uses_the_new_weights():
    """A swap staged from CPU weights (side-stream copy) between two steps: each stream continues from
    its state with the new weights, exactly as a CPU model stepping the same sequence would."""
    from models.stream_model import ModelSpec, StreamModel

    torch.manual_seed(0)
    spec = ModelSpec("lstm", 4, 32, head="linear", head_out=2)
    first, second = StreamModel(spec).eval(), StreamModel(spec).eval()
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((2, 64, 4)).astype(np.float32)
    with Engine(StreamModel(spec).eval(), device="cuda") as engine:
        engine.swap_weights(first.state_dict(), 1)
        engine.step_many(list(range(64)), xs[0])
        engine.swap_weights({k: v.cpu() for k, v in second.state_dict().items()}, 2)
        out = engine.step_many(list(range(64)), xs[1])
        assert engine.model.info.version == 2 and [v for v, _, _ in engine.weight_history()] == [0, 1, 2]
    with torch.no_grad():
        _, state = first.step(torch.from_numpy(xs[0]), first.initial_state(64))
        expected, _ = second.step(torch.from_numpy(xs[1]), state)
    np.testing.assert_allclose(out, expected.numpy(), atol=ATOL, rtol=ATOL)
