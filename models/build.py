"""``build_model``: the model class a ``ModelSpec`` describes, with fresh weights.

Every place that rebuilds a model from its spec (bundles, the fine-tuning worker) goes through here, so a
new architecture is one more branch, not a change in each of them.
"""

from __future__ import annotations

from models.stream_model import ModelInfo, ModelSpec, StreamModel
from models.utterance import UtteranceModel


def build_model(spec: ModelSpec, info: ModelInfo | None = None) -> StreamModel:
    """The model of ``spec`` (weights initialised, not trained), in train mode as ``nn.Module``s start."""
    if spec.utterance_frames > 0:  # buffered utterances, the whole model at each end
        return UtteranceModel(spec, info)  # type: ignore[return-value]  # the engine's model protocol
    return StreamModel(spec, info)
