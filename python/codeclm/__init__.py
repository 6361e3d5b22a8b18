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

import functools
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import numpy as np
import polars as pl

from . import h264, jpeg
from ._native import CodecShard, Grammar as _Grammar, Loader as _Loader, TokenShard, __version__
from ._native import Vocab as _Vocab

__all__ = [
    "Dataset", "Tokens", "Vocab", "Windows", "Grammar", "CodecShard", "TokenShard", "jpeg", "h264", "__version__",
]

PathLike = Union[str, "os.PathLike[str]"]


class Vocab:
    """A byte-level BPE vocabulary (a `tokenizer.json` from `codeclm vocab train`): bytes to ids
    and back, the same ids as Hugging Face `tokenizers` on the same file."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._v = _Vocab(os.fspath(path))

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

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


class Grammar:
    """A dataset's stream grammar over a vocabulary, for any sampler: `state(prompt_ids)`
    walks a sequence, `mask()` says which ids may come next (EOS once the stream may end),
    `advance(id)` moves on. The masks `codeclm sample --constrain` applies to the logits.

        st = grammar.state(prompt_ids)
        for _ in range(n):
            logits[~st.mask()] = -inf; t = sample(logits); st.advance(t)
    """

    def __init__(self, native, vocab: Vocab):
        self._g, self.vocab = native, vocab

    @property
    def header(self) -> Optional[bytes]:
        """The stream header every sample starts with (JPEG; None for H.264)."""
        return self._g.header

    def state(self, ids=()) -> "GrammarState":
        """The state after `ids` (BOS and other special tokens consume nothing); ValueError
        naming the byte where they leave the grammar."""
        return GrammarState(self._g.state(np.asarray(ids, dtype="<u2").tobytes()))

    def mask(self, ids) -> np.ndarray:
        """The mask after `ids` (a bool per id of the vocabulary)."""
        return self.state(ids).mask()


class GrammarState:
    """One sequence's place in a `Grammar`."""

    def __init__(self, native):
        self._s = native

    def mask(self) -> np.ndarray:
        return np.frombuffer(self._s.mask(), dtype=np.bool_)

    def advance(self, token: int) -> bool:
        """Consumes `token`; False (and the state is spent) when the grammar forbids it."""
        return self._s.advance(int(token))

    def copy(self) -> "GrammarState":
        return GrammarState(self._s.copy())


class _Shards:
    """At most `limit` open shards, least recently used closed first."""

    def __init__(self, opener, limit: int = 64):
        self._open, self._limit, self._shards = opener, limit, OrderedDict()

    def __getstate__(self) -> dict:
        # Open shards stay with their process (a DataLoader worker opens its own).
        return {"_open": self._open, "_limit": self._limit, "_shards": OrderedDict()}

    def get(self, path: Path):
        key = os.fspath(path)
        shard = self._shards.pop(key, None)
        if shard is None:
            shard = self._open(key)
            if len(self._shards) >= self._limit:
                self._shards.popitem(last=False)
        self._shards[key] = shard
        return shard


def _open_token_shard(vocab_hash: str, path: str) -> TokenShard:
    return TokenShard(path, vocab_hash)


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

    def image_settings(self) -> dict:
        """The images' build settings (`dataset.json`'s `build.image`: size, resize, jpeg...)."""
        return self.config["build"]["image"]

    def video_settings(self) -> dict:
        """The videos' build settings (`build.video`: fps, width, height, duration_ms...)."""
        return self.config["build"]["video"]

    def jpeg_grammar(self, vocab: "Vocab") -> "Grammar":
        """The grammar `codeclm sample --constrain jpeg` masks with: the dataset's fixed header
        (its size and JPEG settings), then the scan at the Huffman level with its tables."""
        tables = self.jpeg_tables()
        if tables is None:
            raise FileNotFoundError(f"{self.path} has no jpeg_tables.jpg, so its JPEG grammar is unknown")
        cfg = self.image_settings()
        return Grammar(_Grammar.jpeg(cfg["size"], json.dumps(cfg["jpeg"]), tables, vocab._v), vocab)

    def h264_grammar(self, vocab: "Vocab", prompts=(), max_frames: Optional[int] = None) -> "Grammar":
        """The grammar `codeclm sample --constrain h264` masks with: the parameter sets of the
        dataset's first 256 videos (and of `prompts`, streams), slices in order, at most
        `max_frames` frames (default: the dataset's fps x seconds)."""
        if max_frames is None:
            v = self.video_settings()
            max_frames = v["fps"] * v["duration_ms"] // 1000
        rows = (
            self.samples()
            .filter((pl.col("status") == "ok") & (pl.col("modality") == "video"))
            .select("sample_id")
            .head(256)
            .collect()
        )
        streams = [self.codec_bytes(i) for i in rows["sample_id"]] + [bytes(p) for p in prompts]
        if not streams:
            raise ValueError(f"{self.path} has no videos to learn the H.264 grammar from")
        return Grammar(_Grammar.h264(streams, int(max_frames), vocab._v), vocab)

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
        self._shards = _Shards(functools.partial(_open_token_shard, self.hash))

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
        self,
        context: int,
        batch: int,
        seed: int = 0,
        mix: Optional[dict] = None,
        rank: int = 0,
        world_size: int = 1,
        as_torch: Optional[bool] = None,
    ) -> "Windows":
        """The trainer's training stream: batches of `batch` windows of `context + 1` tokens of
        the `train` documents, shuffled per epoch from `seed`, modalities drawn by `mix`
        (modality -> weight; default: by their share of training tokens). The same windows as
        `codeclm train --seed SEED` on this token set (and `codeclm dataset windows`).

        With `world_size` ranks, each global batch is `world_size * batch` windows and rank
        `rank` gets its `batch` of them (rank 0 the first); under a torch `DataLoader` with
        workers, the workers take this rank's batches in turn. `as_torch`: int64 torch tensors
        (default when torch is installed) or uint16 numpy arrays."""
        return Windows(self, context, batch, seed, mix or {}, rank, world_size, as_torch)

    def __repr__(self) -> str:
        return f"Tokens({str(self.dataset.path)!r}, vocab={self.hash})"


_MODALITIES = {"image": 0, "video": 1}
_SPLITS = {"train": 0, "val": 1}


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


_TORCH = _torch()
_IterableDataset = _TORCH.utils.data.IterableDataset if _TORCH is not None else object


class Windows(_IterableDataset):
    """An endless iterator of (inputs, targets), each of shape (batch, context), targets
    shifted by one: int64 torch tensors, or uint16 numpy arrays without torch (or with
    `as_torch=False`). A torch `IterableDataset` when torch is installed:
    `DataLoader(windows, batch_size=None, num_workers=N)` yields the same batches in the same
    order as iterating it directly.

    `state_dict()` / `load_state_dict()` resume it exactly. The state is the position in the
    global stream after the last global batch, the same on every rank, so a checkpoint of any
    rank resumes on any number of ranks with the same global batch (`world_size * batch`).
    Under a `DataLoader` with workers the batches are made in the workers: the state after
    `n` batches the loop took is `state_after(n)`."""

    def __init__(
        self,
        tokens: Tokens,
        context: int,
        batch: int,
        seed: int,
        mix: dict,
        rank: int = 0,
        world_size: int = 1,
        as_torch: Optional[bool] = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world_size {world_size}: need 0 <= rank < world_size")
        if batch < 1 or context < 1:
            raise ValueError(f"batch {batch} and context {context} must be at least 1")
        if as_torch and _TORCH is None:
            raise ImportError("as_torch=True needs torch. Fix: pip install torch, or pass as_torch=False")
        self.tokens, self.context, self.batch, self.seed = tokens, context, batch, seed
        self.mix = {str(k): float(v) for k, v in mix.items()}
        self.rank, self.world_size = rank, world_size
        self.as_torch = _TORCH is not None if as_torch is None else bool(as_torch)
        self._table = None
        self._loader = self._new_loader()
        self._loader.set_share(world_size * batch, rank * batch, batch)
        self._shadow = None  # (position, batches, loader) of `state_after`

    def _columns(self):
        """The manifest as the native loader's columns (read once per process)."""
        if self._table is None:
            m = (
                self.tokens.manifest()
                .select("shard", "offset", "n_tokens", "codec_bytes", "modality", "split")
                .collect()
            )
            names = m["shard"].unique(maintain_order=True)
            index = pl.DataFrame({"shard": names, "_i": pl.arange(0, names.len(), eager=True, dtype=pl.UInt32)})
            ids = m.select("shard").join(index, on="shard", how="left", maintain_order="left")["_i"]
            col = lambda name, dtype: m[name].to_numpy().astype(dtype).tobytes()  # noqa: E731
            self._table = (
                names.to_list(),
                ids.to_numpy().astype("<u4").tobytes(),
                col("offset", "<u8"),
                col("n_tokens", "<u4"),
                col("codec_bytes", "<u4"),
                m["modality"].replace_strict(_MODALITIES, return_dtype=pl.UInt8).to_numpy().tobytes(),
                m["split"].replace_strict(_SPLITS, return_dtype=pl.UInt8).to_numpy().tobytes(),
            )
        return self._table

    def _new_loader(self):
        t, v = self.tokens, self.tokens.vocab
        return _Loader(
            os.fspath(t.dataset.path), t.hash, v.bos, v.eos, *self._columns(), self.context, self.seed, self.mix
        )

    def __getstate__(self) -> dict:
        # What a DataLoader worker gets: the settings and the position, not the native loader.
        state = {k: v for k, v in self.__dict__.items() if k not in ("_loader", "_shadow", "_table")}
        state["_position"] = self._loader.state_json()
        return state

    def __setstate__(self, state: dict) -> None:
        position = state.pop("_position")
        self.__dict__.update(state)
        self._table, self._shadow = None, None
        self._loader = self._new_loader()
        self._loader.set_state_json(position)
        self._loader.set_share(self.world_size * self.batch, self.rank * self.batch, self.batch)

    def __iter__(self) -> "Windows":
        info = _TORCH.utils.data.get_worker_info() if _TORCH is not None else None
        if info is not None and info.num_workers > 1:
            self._as_worker(info.id, info.num_workers)
        return self

    def _as_worker(self, worker: int, workers: int) -> None:
        """Makes this copy (a DataLoader worker's) take this rank's batches `worker`,
        `worker + workers`, ... from its position on."""
        period = self.world_size * self.batch
        self._loader.set_share(period * workers, self.rank * self.batch + worker * period, self.batch)

    def __next__(self):
        x, y = self._loader.next_batch_u16(self.batch)
        shape = (self.batch, self.context)
        x = np.frombuffer(x, dtype="<u2").reshape(shape)
        y = np.frombuffer(y, dtype="<u2").reshape(shape)
        if self.as_torch:
            return _TORCH.from_numpy(x.astype(np.int64)), _TORCH.from_numpy(y.astype(np.int64))
        return x, y

    def state_dict(self) -> dict:
        """Everything that decides the rest of the stream (JSON-serialisable): the global
        position after the batches this object handed out."""
        return self._state(json.loads(self._loader.state_json()))

    def state_after(self, batches: int) -> dict:
        """The state after `batches` more batches than this object handed out itself (a
        `DataLoader`'s loop over it: the batches the loop took since this object was created
        or last loaded). Costs no token reads but one per call."""
        if batches < 0:
            raise ValueError(f"batches must be >= 0, not {batches}")
        base = self._loader.state_json()
        if self._shadow is None or self._shadow[0] != base or self._shadow[1] > batches:
            loader = self._new_loader()
            loader.set_state_json(base)
            self._shadow = [base, 0, loader]
        _, done, loader = self._shadow
        loader.skip_windows((batches - done) * self.world_size * self.batch)
        self._shadow[1] = batches
        return self._state(json.loads(loader.state_json()))

    def _state(self, loader: dict) -> dict:
        return {"loader": loader, "context": self.context, "global_batch": self.world_size * self.batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continues from `state` (of this or another process, on any number of ranks with the
        same global batch)."""
        if state.get("context") != self.context:
            raise ValueError(f"the state is of a stream with context {state.get('context')}, this one has {self.context}")
        gb = state.get("global_batch", self.world_size * self.batch)
        if gb != self.world_size * self.batch:
            raise ValueError(
                f"the state is of a run with global batch {gb}, this stream's is "
                f"{self.world_size * self.batch} (world_size {self.world_size} x batch {self.batch}): "
                "resume with the same global batch"
            )
        self._loader.set_state_json(json.dumps(state["loader"]))
        self._loader.set_share(self.world_size * self.batch, self.rank * self.batch, self.batch)
        self._shadow = None

    def __repr__(self) -> str:
        return (
            f"Windows(context={self.context}, batch={self.batch}, seed={self.seed}, "
            f"rank={self.rank}, world_size={self.world_size})"
        )
