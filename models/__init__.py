"""Streamable recurrent models: cells, heads, the ``StreamModel`` stack, import from torch, bundles."""

from models.bundle import BundleError, load_bundle, save_bundle
from models.cells import CELL_KINDS, CellKind, RecurrentLayer
from models.convert import UnstreamableModelError, from_torch
from models.heads import HEAD_KINDS, Head, HeadKind
from models.stream_model import ModelInfo, ModelSpec, StreamModel
from models.utterance import UtteranceModel

__all__ = [
    "CELL_KINDS",
    "HEAD_KINDS",
    "BundleError",
    "CellKind",
    "Head",
    "HeadKind",
    "ModelInfo",
    "ModelSpec",
    "RecurrentLayer",
    "StreamModel",
    "UnstreamableModelError",
    "UtteranceModel",
    "from_torch",
    "load_bundle",
    "save_bundle",
]
