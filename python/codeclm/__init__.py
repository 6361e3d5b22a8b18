"""codeclm from Python: datasets built by `codeclm dataset build`, their token sets, and the
vocabularies, for PyTorch trainers and notebooks.

    import codeclm
    ds = codeclm.Dataset("data")
    ds.samples().filter(pl.col("status") == "ok").collect()    # the manifest, a polars LazyFrame
    jpeg = ds.codec_bytes("3f2a9c0d1e4b5a67")                   # the stored (abbreviated) stream
    toks = ds.tokens()                                          # the only token set, or vocab=HASH
    for sample_id, doc in toks.documents(split="train"):       # numpy uint16, BOS ... EOS
        ...

Manifests are read with Python polars; codec shards, token shards and vocabularies with the
native module (`codeclm._native`, the same Rust code as the CLI).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import polars as pl

from . import jpeg
from ._native import CodecShard, Loader as _Loader, TokenShard, __version__
from ._native import Vocab as _Vocab

__all__ = ["Dataset", "Tokens", "Vocab", "Windows", "CodecShard", "TokenShard", "jpeg", "__version__"]

PathLike = Union[str, "os.PathLike[str]"]


class Vocab:
    """A byte-level BPE vocabulary (a `tokenizer.json` from `codeclm vocab train`): bytes to ids
    and back, the same ids as Hugging Face `tokenizers` on the same file."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._v = _Vocab(os.fspath(path))

    @property
    def hash(self) -> str:
        return self._v.hash

    @property
    def size(self) -> int:
        return self._v.size

    @property
    def bos(self) -> int:
        return self._v.bos

    @property
    def eos(self) -> int:
        return self._v.eos

    def encode(self, data: bytes) -> np.ndarray:
        """The ids of `data` (no BOS/EOS), as a uint16 array."""
        return np.frombuffer(self._v.encode_u16(bytes(data)), dtype="<u2")

    def decode(self, ids) -> bytes:
        """The bytes `ids` stand for (BOS, EOS and other special tokens stand for none)."""
        return self._v.decode_u16(np.asarray(ids, dtype="<u2").tobytes())

    def __repr__(self) -> str:
        return f"Vocab({str(self.path)!r}, hash={self.hash}, size={self.size})"


class _Shards:
    """At most `limit` open shards, least recently used closed first."""

    def __init__(self, opener, limit: int = 64):
        self._open, self._limit, self._shards = opener, limit, OrderedDict()

    def get(self, path: Path):
        key = os.fspath(path)
        shard = self._shards.pop(key, None)
        if shard is None:
            shard = self._open(key)
            if len(self._shards) >= self._limit:
                self._shards.popitem(last=False)
        self._shards[key] = shard
        return shard


class Dataset:
    """A dataset directory: `samples.parquet` (or, while workers are still building, the part
    manifests), the codec shards and `dataset.json`."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        config = self.path / "dataset.json"
        if not config.exists():
            raise FileNotFoundError(
                f"{self.path} is not a codeclm dataset (no dataset.json). Fix: build one with "
                f"`codeclm dataset build --images SRC --out {self.path}`"
            )
        self.config = json.loads(config.read_text())
        self._shards = _Shards(CodecShard)

    def samples(self) -> pl.LazyFrame:
        """Every sample's row (one per input, failures included with their `status` and `error`)."""
        whole = self.path / "samples.parquet"
        if whole.exists():
            return pl.scan_parquet(whole)
        parts = sorted((self.path / "parts").glob("part-*.parquet"))
        if not parts:
            raise FileNotFoundError(f"{self.path} has no samples yet (no samples.parquet, no parts/)")
        return pl.scan_parquet(parts)

    def _row(self, sample_id: str) -> dict:
        rows = (
            self.samples()
            .filter(pl.col("sample_id") == sample_id)
            .select("sample_id", "status", "error", "shard", "record")
            .collect()
        )
        if rows.height == 0:
            raise KeyError(f"{self.path}: no sample {sample_id!r}")
        return rows.row(0, named=True)

    def codec_bytes(self, sample_id: str) -> bytes:
        """The stored codec bytes of a sample: an abbreviated JPEG stream (its tables are in
        `jpeg_tables()`) or an H.264 Annex B stream."""
        row = self._row(sample_id)
        if row["status"] != "ok":
            raise ValueError(f"{self.path}: sample {sample_id} failed ({row['status']}: {row['error']})")
        return self._shards.get(self.path / row["shard"]).read(row["record"])

    def jpeg(self, sample_id: str) -> bytes:
        """A standalone JPEG of an image sample: its abbreviated stream with the dataset's
        tables spliced back (the bytes `codeclm dataset export` writes)."""
        tables = self.jpeg_tables()
        if tables is None:
            raise FileNotFoundError(f"{self.path} has no jpeg_tables.jpg (a dataset without images?)")
        return jpeg.splice_tables(self.codec_bytes(sample_id), tables)

    def jpeg_tables(self) -> Optional[bytes]:
        """The tables-only JPEG stream every abbreviated image record shares."""
        p = self.path / "jpeg_tables.jpg"
        return p.read_bytes() if p.exists() else None

    def token_sets(self) -> list:
        """Hashes of the vocabularies this dataset has token shards for."""
        root = self.path / "tokens"
        if not root.is_dir():
            return []
        return sorted(d.name for d in root.iterdir() if (d / "vocab.json").exists())

    def tokens(self, vocab: Optional[PathLike] = None) -> "Tokens":
        return Tokens(self, vocab)

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r})"


class Tokens:
    """A token set of a dataset, named as `--vocab` names it: a hash, a unique prefix of one, a
    vocabulary json, or nothing when the dataset has exactly one."""

    def __init__(self, dataset: Union[Dataset, PathLike], vocab: Optional[PathLike] = None):
        self.dataset = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
        root = self.dataset.path
        sets = self.dataset.token_sets()
        if vocab is not None and (os.fspath(vocab).endswith(".json") or Path(vocab).is_file()):
            self.vocab = Vocab(vocab)
            self.hash = self.vocab.hash
        else:
            hits = sets if vocab is None else [s for s in sets if s.startswith(os.fspath(vocab))]
            if len(hits) != 1:
                fix = f"run `codeclm dataset tokenize --dataset {root} --vocab VOCAB.json` first"
                if not sets:
                    raise FileNotFoundError(f"dataset {root} has no token shards. Fix: {fix}")
                if not hits:
                    raise KeyError(f"dataset {root} has no token set {vocab!r}; it has {sets}")
                raise ValueError(f"dataset {root} has token sets {hits}; pick one with vocab=HASH")
            self.hash = hits[0]
            self.vocab = Vocab(root / "tokens" / self.hash / "vocab.json")
        self._manifest = root / f"tokens-{self.hash}.parquet"
        if not self._manifest.exists():
            raise FileNotFoundError(
                f"dataset {root} has no finished tokens for vocabulary {self.hash} "
                f"({self._manifest} is missing). Fix: run `codeclm dataset tokenize --dataset {root} "
                f"--vocab {self.vocab.path}`"
            )
        self._shards = _Shards(lambda p: TokenShard(p, self.hash))

    def manifest(self) -> pl.LazyFrame:
        """`tokens-<hash>.parquet`: sample_id, modality, split, part, shard, offset, n_tokens,
        codec_bytes; joins `Dataset.samples()` on sample_id."""
        return pl.scan_parquet(self._manifest)

    def _read(self, shard: str, offset: int, n: int) -> np.ndarray:
        raw = self._shards.get(self.dataset.path / shard).read_u16(offset, n)
        return np.frombuffer(raw, dtype="<u2")

    def document(self, sample_id: str) -> np.ndarray:
        """A sample's document: uint16 ids, BOS ... EOS."""
        rows = self.manifest().filter(pl.col("sample_id") == sample_id).collect()
        if rows.height == 0:
            raise KeyError(f"no sample {sample_id!r} in token set {self.hash}")
        r = rows.row(0, named=True)
        return self._read(r["shard"], r["offset"], r["n_tokens"])

    def documents(
        self, split: Optional[str] = None, modality: Optional[str] = None
    ) -> Iterator[Tuple[str, np.ndarray]]:
        """(sample_id, document) in manifest order (shard by shard), optionally of one split
        (`train`/`val`) and modality (`image`/`video`)."""
        lf = self.manifest()
        if split is not None:
            lf = lf.filter(pl.col("split") == split)
        if modality is not None:
            lf = lf.filter(pl.col("modality") == modality)
        rows = lf.select("sample_id", "shard", "offset", "n_tokens").collect()
        for sample_id, shard, offset, n in rows.iter_rows():
            yield sample_id, self._read(shard, offset, n)

    def windows(
        self, context: int, batch: int, seed: int = 0, mix: Optional[dict] = None
    ) -> "Windows":
        """The trainer's training stream: batches of `batch` windows of `context + 1` tokens of
        the `train` documents, shuffled per epoch from `seed`, modalities drawn by `mix`
        (modality -> weight; default: by their share of training tokens). The same windows as
        `codeclm train --seed SEED` on this token set (and `codeclm dataset windows`)."""
        return Windows(self, context, batch, seed, mix or {})

    def __repr__(self) -> str:
        return f"Tokens({str(self.dataset.path)!r}, vocab={self.hash})"


_MODALITIES = {"image": 0, "video": 1}
_SPLITS = {"train": 0, "val": 1}


class Windows:
    """An endless iterator of (inputs, targets), each a uint16 array of shape (batch, context),
    targets shifted by one. `state_dict()` / `load_state_dict()` resume it exactly."""

    def __init__(self, tokens: Tokens, context: int, batch: int, seed: int, mix: dict):
        m = tokens.manifest().select("shard", "offset", "n_tokens", "codec_bytes", "modality", "split").collect()
        shards, index = [], {}
        for s in m["shard"].to_list():
            if s not in index:
                index[s] = len(shards)
                shards.append(s)
        col = lambda name, dtype: m[name].to_numpy().astype(dtype).tobytes()  # noqa: E731
        self.context, self.batch = context, batch
        self._loader = _Loader(
            os.fspath(tokens.dataset.path),
            tokens.hash,
            tokens.vocab.bos,
            tokens.vocab.eos,
            shards,
            np.array([index[s] for s in m["shard"].to_list()], dtype="<u4").tobytes(),
            col("offset", "<u8"),
            col("n_tokens", "<u4"),
            col("codec_bytes", "<u4"),
            m["modality"].replace_strict(_MODALITIES, return_dtype=pl.UInt8).to_numpy().tobytes(),
            m["split"].replace_strict(_SPLITS, return_dtype=pl.UInt8).to_numpy().tobytes(),
            context,
            seed,
            {str(k): float(v) for k, v in mix.items()},
        )

    def __iter__(self) -> "Windows":
        return self

    def __next__(self) -> Tuple[np.ndarray, np.ndarray]:
        x, y = self._loader.next_batch_u16(self.batch)
        shape = (self.batch, self.context)
        return np.frombuffer(x, dtype="<u2").reshape(shape), np.frombuffer(y, dtype="<u2").reshape(shape)

    def state_dict(self) -> dict:
        """Everything that decides the rest of the stream (JSON-serialisable)."""
        return {"loader": json.loads(self._loader.state_json()), "context": self.context, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("context") != self.context:
            raise ValueError(f"the state is of a stream with context {state.get('context')}, this one has {self.context}")
        self._loader.set_state_json(json.dumps(state["loader"]))
