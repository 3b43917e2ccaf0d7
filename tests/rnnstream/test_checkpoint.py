"""``LocalCheckpoint``: rows of any length (versioned rows beside rows written before versioning), files of
the fixed-width format written before versioning, and clear errors for files it cannot read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.bundle import write_safetensors
from rnnstream.checkpoint import CheckpointError, LocalCheckpoint


def test_rows_of_different_lengths_survive_a_reopen(tmp_path):
    """A stream rewritten with a layout header sits beside one still holding its row from before
    versioning (and a row without the stages' bookkeeping beside one with it)."""
    rows = {"a": b"\x01" * 8, "b": b"RS\xc1\x7f" + b"\x02" * 21, "c": b"", "d": b"\x03" * 16}
    cp = LocalCheckpoint(tmp_path)
    for sid, row in rows.items():
        cp.write(0 if sid != "d" else 3, sid, row)
    cp.save({"rows": {"f.csv": 9}})
    again = LocalCheckpoint(tmp_path)
    assert again.read([0, 3]) == {0: {k: v for k, v in rows.items() if k != "d"}, 3: {"d": rows["d"]}}
    assert again.positions() == {"rows": {"f.csv": 9}}


def test_an_empty_checkpoint_survives_a_reopen(tmp_path):
    cp = LocalCheckpoint(tmp_path)
    cp.write(0, "a", b"\x01" * 4)
    cp.write(0, "a", None)
    cp.save({"next": 1})
    again = LocalCheckpoint(tmp_path)
    assert again.read([0]) == {0: {}} and again.positions() == {"next": 1}


def test_a_file_of_the_fixed_width_format_before_versioning_loads(tmp_path):
    data = np.arange(12, dtype=np.uint8).reshape(3, 4)
    meta = {
        "format": "rnnstream.checkpoint/1",
        "stream_ids": json.dumps(["a", "b", "c"]),
        "partitions": json.dumps([0, 0, 1]),
        "positions": json.dumps({"next": 7}),
    }
    write_safetensors(tmp_path / "state.safetensors", {"rows": torch.from_numpy(data)}, meta)
    cp = LocalCheckpoint(tmp_path)
    assert cp.read([0, 1]) == {
        0: {"a": data[0].tobytes(), "b": data[1].tobytes()},
        1: {"c": data[2].tobytes()},
    }
    assert cp.positions() == {"next": 7}


@pytest.mark.parametrize(
    ("tensors", "fmt", "message"),
    [
        (
            {"rows": np.zeros(4, np.uint8), "lengths": np.array([2, 3])},
            "rnnstream.checkpoint/2",
            "add up to 5",
        ),
        ({"rows": np.zeros(4, np.uint8)}, "rnnstream.checkpoint/2", "unreadable checkpoint"),
        ({"rows": np.zeros(4, np.uint8)}, "rnnstream.snapshot/2", "not a checkpoint"),
    ],
)
def test_a_checkpoint_file_it_cannot_read_is_a_clear_error(tmp_path, tensors, fmt, message):
    meta = {"format": fmt, "stream_ids": '["a", "b"]', "partitions": "[0, 0]", "positions": "{}"}
    write_safetensors(
        tmp_path / "state.safetensors", {k: torch.from_numpy(v) for k, v in tensors.items()}, meta
    )
    with pytest.raises(CheckpointError, match=message):
        LocalCheckpoint(tmp_path)
