"""Model bundles: round trip, and loading never unpickles anything."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from models import BundleError, ModelInfo, load_bundle, save_bundle


def test_round_trip_keeps_weights_spec_and_info(ref_factory, tmp_path):
    ref = ref_factory("lstm", num_layers=2, proj_size=3, head_out=2, head_kind="classifier")
    ref.model.info = ModelInfo(version=7, features={"normalise": [0.5, 2.0]}, trained_on={"seed": 1})
    path = save_bundle(ref.model, tmp_path / "m.safetensors")
    loaded = load_bundle(path)
    assert loaded.spec == ref.model.spec
    assert loaded.info == ref.model.info
    seq = ref.random_inputs(np.random.default_rng(0), 9)
    with torch.no_grad():
        a, _ = ref.model(torch.as_tensor(seq).unsqueeze(1))
        b, _ = loaded(torch.as_tensor(seq).unsqueeze(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_categorical_round_trip(ref_factory, tmp_path):
    ref = ref_factory("gru", num_embeddings=5, head_out=2)
    loaded = load_bundle(save_bundle(ref.model, tmp_path / "m.safetensors"))
    assert loaded.categorical and loaded.spec.num_embeddings == 5


def test_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(BundleError, match="not a safetensors"):
        load_bundle(path)


def test_foreign_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(BundleError, match="format"):
        load_bundle(path)
