"""Writes ``configs/data/digits.wav``, the sample audio of ``configs/digits-files.yaml``: three held-out
FSDD recordings (index 5-9, never trained on; FSDD is CC BY-SA 4.0) separated by 0.5 s of quiet noise,
8 kHz 16-bit mono. Run from the repository root: ``.venv/bin/python scripts/make_sample_digits.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile

FSDD = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd" / "recordings"
OUT = Path(__file__).resolve().parents[1] / "configs" / "data" / "digits.wav"
CLIPS = ["3_theo_5.wav", "1_lucas_7.wav", "4_jackson_9.wav"]
RATE = 8000


def main() -> None:
    rng = np.random.default_rng(0)

    def quiet() -> np.ndarray:
        return rng.normal(0, 3e-4, RATE // 2).astype(np.float32)

    parts = [quiet()]
    for name in CLIPS:
        audio, rate = soundfile.read(FSDD / name, dtype="float32")
        assert rate == RATE, (name, rate)
        parts += [audio, quiet()]
    soundfile.write(OUT, np.concatenate(parts), RATE, subtype="PCM_16")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
