#!/usr/bin/env python3
"""Read a codeclm token set from Python with numpy + zstandard + polars (no codeclm needed).

    python3 tools/read_tokens.py DATASET --vocab HASH [--check-with-tokenizers]

Prints "<sample_id> <n_tokens>" for every tokenized sample. With --check-with-tokenizers it also
reads each sample's codec bytes from the codec shards, encodes them with Python `tokenizers`
from the token set's vocab.json, and checks the ids equal the stored document (minus BOS/EOS).

Token shards (format: formats/src/tokens.rs, docs/tokens.md) are independent zstd frames of u16
tokens with an index at the end, so a document is read by decompressing only its frames. The
snippet users copy is `TokenShard` + the join below:

    tokens = pl.read_parquet(f"{ds}/tokens-{h}.parquet").join(pl.read_parquet(f"{ds}/samples.parquet"), on="sample_id")
    row = tokens.row(0, named=True)
    doc = TokenShard(f"{ds}/{row['shard']}").read(row["offset"], row["n_tokens"])  # BOS ... EOS

Frame checksums (xxh3-64) are checked with the `xxhash` package when it is installed, else with
the system's libxxhash through ctypes, else not at all (`CHECKSUMS` says which).
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import struct
import sys

import numpy as np
import polars as pl
import zstandard

BYTE_CHAR_BASE = 0x2800  # byte b <-> chr(0x2800 + b), the paper's mapping (chr(b + 10240))
HEADER, FOOTER, ENTRY = 64, 48, 32
VERSION = 2


def _xxh3_64():
    """An xxh3-64 function of bytes, or None."""
    try:
        import xxhash

        return "xxhash", xxhash.xxh3_64_intdigest
    except ImportError:
        pass
    name = ctypes.util.find_library("xxhash") or "libxxhash.so.0"
    try:
        lib = ctypes.CDLL(name)
        fn = lib.XXH3_64bits
    except (OSError, AttributeError):
        return "none", None
    fn.restype, fn.argtypes = ctypes.c_uint64, [ctypes.c_char_p, ctypes.c_size_t]
    return "libxxhash", lambda b: fn(b, len(b))


CHECKSUMS, xxh3_64 = _xxh3_64()


class TokenShard:
    """A token shard: header, footer and frame index read at open; frames on demand."""

    def __init__(self, path: str):
        self.path = path
        self.f = open(path, "rb")
        head = self.f.read(HEADER)
        if head[:8] != b"CLMTOKEN":
            raise ValueError(f"{path}: not a token shard (magic {head[:8]!r})")
        version, token_bytes, self.vocab_size, self.frame_tokens = struct.unpack_from("<IIII", head, 8)
        if version < VERSION:
            raise ValueError(f"{path} is a version-{version} token shard; rerun `codeclm dataset tokenize`, which rewrites it")
        if version != VERSION or token_bytes != 2:
            raise ValueError(f"{path}: version {version} with {token_bytes}-byte tokens; this reader knows version {VERSION}, u16")
        self.vocab_hash = f"{struct.unpack_from('<Q', head, 24)[0]:016x}"
        self.f.seek(0, 2)
        size = self.f.tell()
        self.f.seek(size - FOOTER)
        foot = self.f.read(FOOTER)
        if len(foot) != FOOTER or foot[40:] != b"CLMTKEND":
            raise ValueError(f"{path}: no footer (truncated or unfinished); rerun `codeclm dataset tokenize`")
        index_offset, frames, self.token_count, self.docs, checksum = struct.unpack_from("<QQQQQ", foot)
        if index_offset + frames * ENTRY + FOOTER != size:
            raise ValueError(f"{path}: the footer's index does not end the file")
        self.f.seek(index_offset)
        index = self.f.read(frames * ENTRY)
        if xxh3_64 is not None and xxh3_64(head + index + foot[:32]) != checksum:
            raise ValueError(f"{path}: the header, frame index or footer fails its checksum")
        # (offset, compressed_len, token_count, first_token, checksum) per frame
        self.frames = [struct.unpack_from("<QIIQQ", index, i * ENTRY) for i in range(frames)]

    def frame(self, i: int) -> np.ndarray:
        offset, clen, count, first, checksum = self.frames[i]
        self.f.seek(offset)
        raw = zstandard.ZstdDecompressor().decompress(self.f.read(clen), max_output_size=count * 2)
        if len(raw) != count * 2 or (xxh3_64 is not None and xxh3_64(raw) != checksum):
            raise ValueError(f"{self.path}: frame {i} (tokens {first}..{first + count}) fails its checksum")
        return np.frombuffer(raw, dtype="<u2")

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens start..start+n, decompressing only the frames they are in."""
        if start < 0 or n < 0 or start + n > self.token_count:
            raise ValueError(f"{self.path}: tokens {start}..{start + n} are past its {self.token_count} tokens")
        if n == 0:
            return np.zeros(0, dtype="<u2")
        ft, end = self.frame_tokens, start + n
        parts = [self.frame(i) for i in range(start // ft, (end - 1) // ft + 1)]
        base = (start // ft) * ft
        return np.concatenate(parts)[start - base : end - base]

    def read_all(self) -> np.ndarray:
        return self.read(0, self.token_count)


def read_token_shard(path: str) -> tuple[np.ndarray, str, int]:
    """All tokens of a shard (u16), the vocabulary hash it was written with, its vocab size."""
    s = TokenShard(path)
    return s.read_all(), s.vocab_hash, s.vocab_size


def read_codec_record(path: str, record: int) -> bytes:
    """One record of a codec shard (format: formats/src/shard.rs)."""
    raw = open(path, "rb").read()
    if raw[:8] != b"CLMCODEC":
        raise ValueError(f"{path}: not a codec shard")
    count, index_offset = struct.unpack_from("<QQ", raw, 16)
    offset, clen, rawlen, _checksum = struct.unpack_from("<QIIQ", raw, index_offset + 24 * record)
    data = zstandard.ZstdDecompressor().decompress(raw[offset : offset + clen], max_output_size=rawlen)
    assert len(data) == rawlen
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("--vocab", required=True, help="hash of the token set (tokens-<hash>.parquet)")
    ap.add_argument("--check-with-tokenizers", action="store_true")
    a = ap.parse_args()
    ds, h = a.dataset, a.vocab
    tokens = pl.read_parquet(f"{ds}/tokens-{h}.parquet")
    samples = pl.read_parquet(f"{ds}/samples.parquet").select("sample_id", pl.col("shard").alias("codec_shard"), "record")
    table = tokens.join(samples, on="sample_id", how="left")
    tok = None
    if a.check_with_tokenizers:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(f"{ds}/tokens/{h}/vocab.json")
        bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    shards: dict[str, TokenShard] = {}
    checked = 0
    for row in table.iter_rows(named=True):
        if row["shard"] not in shards:
            shard = TokenShard(f"{ds}/{row['shard']}")
            if shard.vocab_hash != h:
                raise ValueError(f"{row['shard']} was written with vocabulary {shard.vocab_hash}, not {h}")
            # The whole shard equals its documents read one by one (seeks across frames).
            whole = shard.read_all()
            shards[row["shard"]] = shard
        else:
            whole = None
        doc = shards[row["shard"]].read(row["offset"], row["n_tokens"])
        if whole is not None and not np.array_equal(whole[row["offset"] : row["offset"] + row["n_tokens"]], doc):
            print(f"MISMATCH {row['sample_id']}: a range read differs from the whole shard", file=sys.stderr)
            return 1
        print(f"{row['sample_id']} {len(doc)}")
        if tok is not None:
            data = read_codec_record(f"{ds}/{row['codec_shard']}", row["record"])
            ids = tok.encode("".join(chr(BYTE_CHAR_BASE + b) for b in data), add_special_tokens=False).ids
            if [int(doc[0]), int(doc[-1])] != [bos, eos] or ids != doc[1:-1].tolist():
                print(f"MISMATCH {row['sample_id']}: Python tokenizers gives {len(ids)} ids, the shard holds {len(doc) - 2}", file=sys.stderr)
                return 1
            checked += 1
    if tok is not None:
        print(f"checked {checked} samples (frame checksums: {CHECKSUMS})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
