#!/usr/bin/env python3
"""Read a codeclm token set from Python with numpy + zstandard + polars (no codeclm needed).

    python3 tools/read_tokens.py DATASET --vocab HASH [--check-with-tokenizers]

Prints "<sample_id> <n_tokens>" for every tokenized sample. With --check-with-tokenizers it also
reads each sample's codec bytes from the codec shards, encodes them with Python `tokenizers`
from the token set's vocab.json, and checks the ids equal the stored document (minus BOS/EOS).

The snippet users copy is `read_token_shard` + the join below:

    import numpy as np, polars as pl, struct, zstandard
    def read_token_shard(path):
        raw = open(path, "rb").read()
        assert raw[:8] == b"CLMTOKEN"
        count, payload_len = struct.unpack_from("<Q", raw, 32)[0], struct.unpack_from("<Q", raw, 48)[0]
        assert len(raw) == 64 + payload_len
        return np.frombuffer(zstandard.ZstdDecompressor().decompress(raw[64:]), dtype="<u2")
    tokens = pl.read_parquet(f"{ds}/tokens-{h}.parquet").join(pl.read_parquet(f"{ds}/samples.parquet"), on="sample_id")
    row = tokens.row(0, named=True)
    doc = read_token_shard(f"{ds}/{row['shard']}")[row["offset"] : row["offset"] + row["n_tokens"]]  # BOS ... EOS
"""
from __future__ import annotations

import argparse
import struct
import sys

import numpy as np
import polars as pl
import zstandard

BYTE_CHAR_BASE = 0x2800  # byte b <-> chr(0x2800 + b), the paper's mapping (chr(b + 10240))


def read_token_shard(path: str) -> tuple[np.ndarray, str, int]:
    """All tokens of a shard (u16), the vocabulary hash it was written with, its vocab size."""
    raw = open(path, "rb").read()
    if raw[:8] != b"CLMTOKEN":
        raise ValueError(f"{path}: not a token shard (magic {raw[:8]!r})")
    version, token_bytes, vocab_size = struct.unpack_from("<III", raw, 8)
    if version != 1 or token_bytes != 2:
        raise ValueError(f"{path}: version {version} with {token_bytes}-byte tokens; this reader knows version 1, u16")
    vocab_hash, count, docs, payload_len = struct.unpack_from("<QQQQ", raw, 24)
    if len(raw) != 64 + payload_len:
        raise ValueError(f"{path}: truncated ({len(raw)} bytes, header says {64 + payload_len})")
    tokens = np.frombuffer(zstandard.ZstdDecompressor().decompress(raw[64:], max_output_size=count * 2), dtype="<u2")
    if len(tokens) != count:
        raise ValueError(f"{path}: {len(tokens)} tokens, header says {count}")
    return tokens, f"{vocab_hash:016x}", vocab_size


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
    shards: dict[str, np.ndarray] = {}
    checked = 0
    for row in table.iter_rows(named=True):
        if row["shard"] not in shards:
            toks, shard_hash, _ = read_token_shard(f"{ds}/{row['shard']}")
            if shard_hash != h:
                raise ValueError(f"{row['shard']} was written with vocabulary {shard_hash}, not {h}")
            shards[row["shard"]] = toks
        doc = shards[row["shard"]][row["offset"] : row["offset"] + row["n_tokens"]]
        print(f"{row['sample_id']} {len(doc)}")
        if tok is not None:
            data = read_codec_record(f"{ds}/{row['codec_shard']}", row["record"])
            ids = tok.encode("".join(chr(BYTE_CHAR_BASE + b) for b in data), add_special_tokens=False).ids
            if [int(doc[0]), int(doc[-1])] != [bos, eos] or ids != doc[1:-1].tolist():
                print(f"MISMATCH {row['sample_id']}: Python tokenizers gives {len(ids)} ids, the shard holds {len(doc) - 2}", file=sys.stderr)
                return 1
            checked += 1
    if tok is not None:
        print(f"checked {checked} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
