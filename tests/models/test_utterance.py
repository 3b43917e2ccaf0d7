"""``UtteranceModel``: torch's bidirectional (and unidirectional) RNN/GRU/LSTM imported in utterance mode;
its batched run over utterances of different lengths equals the torch module on each one alone; the
buffer it keeps in the stream state; bundles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models import ModelSpec, UnstreamableModelError, from_torch, load_bundle, save_bundle
from models.build import build_model
from models.utterance import UtteranceModel
from tests.models.utterance_reference import make_utterance_reference

ATOL = RTOL = 1e-5


def _padded(seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Utterances as ``(T, B, F)`` (or ``(T, B)`` ids), zero-padded, and their lengths ``(B,)``."""
    longest = max(len(s) for s in seqs)
    padded = np.stack(
        [np.concatenate([s, np.zeros((longest - len(s), *s.shape[1:]), s.dtype)]) for s in seqs]
    )
    return torch.as_tensor(padded).transpose(0, 1), torch.tensor([len(s) for s in seqs])


@pytest.mark.parametrize("kind", ["rnn_tanh", "rnn_relu", "gru", "lstm"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_batched_run_equals_the_torch_module_on_each_utterance(kind, num_layers, bidirectional, pooling):
    ref = make_utterance_reference(kind, num_layers, bidirectional, pooling=pooling, seed=num_layers)
    seqs = [ref.random_inputs(np.random.default_rng(n), n) for n in (5, 1, 12, 8)]
    with torch.no_grad():
        got = ref.model.run(*_padded(seqs)).numpy()
    np.testing.assert_allclose(got, np.stack([ref.run(s) for s in seqs]), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_embedding_projection_and_batch_first_modules(kind):
    ref = make_utterance_reference(
        kind, 2, num_embeddings=11, proj_size=3 if kind == "lstm" else 0, batch_first=True, seed=3
    )
    seqs = [ref.random_inputs(np.random.default_rng(n), n) for n in (7, 2, 12)]
    with torch.no_grad():
        got = ref.model.run(*_padded(seqs)).numpy()
    np.testing.assert_allclose(got, np.stack([ref.run(s) for s in seqs]), atol=ATOL, rtol=RTOL)


def test_step_writes_each_row_at_its_length_and_counts_frames_past_the_bound():
    model = make_utterance_reference("gru", max_frames=2, input_size=3).model
    state = model.initial_state(2)
    state[1][0, 0] = 2  # row 0 is full, row 1 is empty
    x = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    y, (frames, counts) = model.step(x, state)
    assert torch.isnan(y).all() and y.shape == (2, 3)
    assert counts.tolist() == [[2, 1], [1, 0]]
    assert frames[0].tolist() == [0] * 6  # not written: past the bound
    assert frames[1].tolist() == [4, 5, 6, 0, 0, 0]
    assert state[1][1].tolist() == [0, 0]  # the state handed in is left as it was


def test_end_refusals_name_the_bound_and_empty_utterances():
    model = make_utterance_reference("lstm", max_frames=4).model
    counts = torch.tensor([[4.0, 3.0], [0.0, 0.0], [2.0, 0.0]])
    frames = torch.zeros(3, model.state_widths()[0])
    assert model.end_refusals([frames, counts]) == [
        "utterance of 7+ frames passes the bound of 4 (utterance_frames)",
        "empty utterance: no frame before its end marker",
        None,
    ]
    out = model.end_output([frames, counts])
    assert torch.isnan(out[:2]).all() and torch.isfinite(out[2]).all()


def test_state_is_the_buffer_and_its_extras_are_named():
    model = make_utterance_reference("gru", max_frames=12, input_size=4, num_embeddings=0).model
    assert model.layer_state_widths() == []
    assert model.extra_states() == [("utterance_frames", 48), ("utterance_length", 2)]
    assert model.state_widths() == [48, 2]
    categorical = make_utterance_reference("gru", max_frames=12, num_embeddings=6).model
    assert categorical.extra_states()[0] == ("utterance_frames", 12)  # one id per frame


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
def test_per_step_streaming_still_refuses_bidirectional_modules(cls):
    with pytest.raises(UnstreamableModelError, match="utterance_frames"):
        from_torch(cls(3, 4, bidirectional=True))
    assert isinstance(from_torch(cls(3, 4, bidirectional=True), utterance_frames=5), UtteranceModel)


def test_import_refuses_cells_and_a_head_of_the_wrong_width():
    with pytest.raises(TypeError, match="utterance mode"):
        from_torch(nn.GRUCell(3, 4), utterance_frames=5)
    with pytest.raises(ValueError, match="head reads 4 features"):
        from_torch(nn.GRU(3, 4, bidirectional=True), nn.Linear(4, 2), utterance_frames=5)  # needs 8


def test_spec_checks_pooling_and_build_model_picks_the_utterance_class():
    with pytest.raises(ValueError, match="utterance_pooling"):
        ModelSpec("gru", 3, 4, utterance_frames=5, utterance_pooling="first")  # type: ignore[arg-type]
    spec = ModelSpec("gru", 3, 4, utterance_frames=5, bidirectional=True)
    assert isinstance(build_model(spec), UtteranceModel)
    assert not isinstance(build_model(ModelSpec("gru", 3, 4)), UtteranceModel)


@pytest.mark.parametrize("pooling", ["last", "max"])
def test_bundle_round_trip(tmp_path, pooling):
    ref = make_utterance_reference("lstm", 2, num_embeddings=5, pooling=pooling, max_frames=9)
    loaded = load_bundle(save_bundle(ref.model, tmp_path / "u.safetensors"))
    assert isinstance(loaded, UtteranceModel) and loaded.spec == ref.model.spec
    seqs = [ref.random_inputs(np.random.default_rng(n), n) for n in (9, 4)]
    with torch.no_grad():
        got = loaded.run(*_padded(seqs)).numpy()
    np.testing.assert_allclose(got, np.stack([ref.run(s) for s in seqs]), atol=ATOL, rtol=RTOL)


def test_a_damaged_buffer_is_refused_and_leaves_the_others_alone():
    ref = make_utterance_reference("gru", num_embeddings=6, max_frames=5)
    model = ref.model
    seq = ref.random_inputs(np.random.default_rng(0), 4)
    good = model.initial_state(1)
    for x in seq:
        _, good = model.step(torch.as_tensor(x).view(1), good)
    rows = [[f.clone() for f in good] for _ in range(5)]
    rows[1][1][0, 0] = 2.5  # a fractional frame count
    rows[2][1][0, 0] = 9  # past the bound
    rows[3][0][0, 1] = 6  # an id past the vocabulary
    rows[4][0][0, 0] = float("nan")
    state = [torch.cat(parts) for parts in zip(*rows, strict=True)]
    refusals = model.end_refusals(state)
    assert refusals[0] is None and all("corrupt utterance buffer" in r for r in refusals[1:])
    with torch.no_grad():
        out = model.end_output(state)
    assert torch.isnan(out[1:]).all()
    np.testing.assert_allclose(out[0].numpy(), ref.run(seq), atol=ATOL, rtol=RTOL)
