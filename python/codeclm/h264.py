"""H.264 bytes the way `codeclm` handles them: a dataset stores each video as one Annex B
stream (one macroblock per slice, the paper's settings); a prompt is its first frames, cut at
the start code of the next frame's first slice.

    p = codeclm.h264.prompt(ds.codec_bytes(video_id), toks.vocab, frames=10)
    figures = codeclm.h264.report(ids, toks.vocab, ds.video_settings(), n_generated=...)

FFmpeg's verdict (frames decoded, concealed, rejected) is `codeclm sample`'s; the Python
package reads the slice structure alone (it links no FFmpeg): write `clean(ids)` to a
`.h264` file and run `ffmpeg -i f.h264 -f null -` for a decoder's view.
"""

from __future__ import annotations

import json
from typing import NamedTuple, Optional

import numpy as np

from ._native import h264_check_slices, h264_prompt

__all__ = ["clean", "prompt", "Prompt", "check_slices", "report"]


def clean(ids, vocab) -> bytes:
    """Generated ids (prompt included) as the `.h264` stream `codeclm sample` writes: the
    bytes they stand for (special tokens and ids past the vocabulary stand for none)."""
    ids = np.asarray(ids, dtype=np.int64)
    return vocab.decode(ids[(ids >= 0) & (ids < vocab.size)])


class Prompt(NamedTuple):
    """A prompt cut from a video's stream: `ids` (uint16, BOS first), `cut` the byte where it
    ends, `frames_total` frames in the whole stream."""

    ids: np.ndarray
    cut: int
    frames_kept: int
    frames_total: int


def prompt(stream: bytes, vocab, frames: int) -> Prompt:
    """The prompt `codeclm sample --modality video --frames N` makes of an Annex B stream:
    its first `frames` frames, as the longest prefix of the stream's tokens that ends at or
    before the next frame's start code."""
    ids, cut, total = h264_prompt(bytes(stream), vocab._v, int(frames))
    return Prompt(np.frombuffer(ids, dtype="<u2"), cut, int(frames), total)


def _frames_and_mbs(settings: dict):
    frames = settings["fps"] * settings["duration_ms"] // 1000
    mbs = -(-settings["width"] // 16) * -(-settings["height"] // 16)
    return frames, mbs


def check_slices(h264: bytes, settings: dict) -> dict:
    """The slice-level check of a stream for a dataset's video settings (`fps`, `width`,
    `height`, `duration_ms`, as in `dataset.json`'s `build.video`): macroblocks in place out of
    those promised, slices, frames."""
    frames, mbs = _frames_and_mbs(settings)
    return json.loads(h264_check_slices(bytes(h264), mbs, frames))


def report(ids, vocab, settings: dict, n_generated: Optional[int] = None, name: str = "") -> dict:
    """The structural part of a generation's entry in `codeclm sample`'s `decodability.json`:
    lengths, EOS, the slice check and its fraction (`slices`, `slice_fraction`,
    `frames_expected`); the decoder's fields are `codeclm sample`'s."""
    ids = np.asarray(ids, dtype=np.int64)
    data = clean(ids, vocab)
    frames, _ = _frames_and_mbs(settings)
    slices = check_slices(data, settings)
    expected = slices["mbs_expected"]
    return {
        "name": name,
        "n_tokens": len(ids) if n_generated is None else int(n_generated),
        "n_bytes": len(data),
        "ended_with_eos": bool(len(ids) and ids[-1] == vocab.eos),
        "frames_expected": frames,
        "slices": slices,
        "slice_fraction": slices["mbs_ok"] / expected if expected else 0.0,
    }
