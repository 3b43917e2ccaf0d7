"""Model bundles on disk: one safetensors file holding the weights, the architecture, the feature settings
and the version. Loading never unpickles anything: safetensors stores raw tensors and a JSON header."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from models.build import build_model
from models.stream_model import ModelInfo, ModelSpec, StreamModel

BUNDLE_FORMAT = "rnnstream.model/1"


class BundleError(ValueError):
    """The file is not a valid rnnstream model bundle."""


def save_bundle(model: StreamModel, path: str | Path) -> Path:
    """Write ``model`` (weights, spec, info) to ``path`` atomically; returns the path."""
    return save_weights(model.spec, model.info, model.state_dict(), path)


def save_weights(spec: ModelSpec, info: ModelInfo, state_dict: dict[str, Tensor], path: str | Path) -> Path:
    """``save_bundle`` from a state dict (no model object needed), atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    metadata = {
        "format": BUNDLE_FORMAT,
        "spec": json.dumps(spec.to_dict()),
        "version": str(info.version),
        "features": json.dumps(info.features),
        "trained_on": json.dumps(info.trained_on),
    }
    return write_safetensors(path, tensors, metadata)


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """The one atomic file write of the project: ``tensors`` and ``metadata`` to a temporary file beside
    ``path``, synced, then renamed over ``path``. A crash (kill -9, power loss) leaves the old file or the
    new one, never half of one. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The bundle's JSON header metadata, without loading the weights."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as exc:  # safetensors raises several unrelated types for corrupt files
        raise BundleError(f"{path}: not a safetensors model bundle ({exc})") from exc


def load_bundle(path: str | Path, device: str = "cpu") -> StreamModel:
    """Load a bundle written by ``save_bundle``; the model is returned in eval mode on ``device``."""
    meta = read_metadata(path)
    if meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: format {meta.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    try:
        spec = ModelSpec.from_dict(json.loads(meta["spec"]))
        info = ModelInfo(
            version=int(meta.get("version", "0")),
            features=json.loads(meta.get("features", "{}")),
            trained_on=json.loads(meta.get("trained_on", "{}")),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise BundleError(f"{path}: bad bundle metadata ({exc})") from exc
    model = build_model(spec, info)
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BundleError(
            f"{path}: weights do not match the spec (missing {missing}, unexpected {unexpected})"
        )
    return model.to(device).eval()
