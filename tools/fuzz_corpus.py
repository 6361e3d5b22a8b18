#!/usr/bin/env python3
"""Write a mutation corpus of hostile images and videos for `codeclm dataset build`.

    python3 tools/fuzz_corpus.py --out target/fuzz-corpus [--seed 17] [--scale 1.0]

Every file is derived from the bundled media (tests/fixtures/images, odd, bad, videos,
videos-bad): truncations, bit flips, byte-range zeroing and overwrites, JPEG marker edits, PNG
chunk edits (with recomputed CRCs), GIF/WebP/BMP/TIFF header edits, container swaps, box edits
and huge dimensions in MP4s (tkhd, stsd, the SPS), playlists and concat lists saved as videos,
text, HTML and random bytes. The layout:

    OUT/images/<family>/<family>__<base>__<variant>.<ext>
    OUT/videos/<family>/<family>__<base>__<variant>.<ext>
    OUT/corpus.json   {"files": {"images/<family>/<name>": {family, base, variant, seed, bytes}}, ...}

The family is both the folder and the file name's prefix, so a manifest's `source` column
(the path relative to --images/--videos) groups by it. No file name ends in an extension the
directory walk skips as a sidecar (.txt, .html, .json, ...): a text file is named .jpg/.mp4.

Deterministic: each file's random bytes come from random.Random(seed), the seed derived from
--seed and the file's name (recorded in corpus.json). Bytes that come from encoders (Pillow's
JPEG/PNG/GIF/WebP/BMP/TIFF, the ffmpeg CLI's remuxes and small clips) depend on their
versions (Pillow 13.0.0, FFmpeg 5.1 here). Needs Pillow and the ffmpeg CLI; without ffmpeg
the derived clips are skipped and only the bundled clips are mutated.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
PHOTOS = FIX / "images"
ODD = FIX / "odd"
BAD = FIX / "bad"
VIDEOS = FIX / "videos"
VIDEOS_BAD = FIX / "videos-bad"

HTML = (b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
        b"<body><h1>Not Found</h1><p>The requested URL was not found on this server.</p>"
        b"<img src=\"photo.jpg\"></body></html>\n")
TEXT = (b"This is not an image.\nIt is a plain text file that a scraper saved with a media "
        b"file name.\n") * 4


ZEROS_4M = zlib.compress(bytes(4_000_000), 9)     # deflate streams for chunk bombs
ZEROS_50M = zlib.compress(bytes(50_000_000), 9)


# ----------------------------------------------------------------------------- the corpus
class Corpus:
    def __init__(self, out: Path, seed: int, scale: float):
        self.out = out
        self.seed = seed
        self.scale = scale
        self.files: dict[str, dict] = {}

    def rng(self, key: str) -> tuple[random.Random, int]:
        s = int.from_bytes(hashlib.sha256(f"{self.seed}:{key}".encode()).digest()[:8], "little")
        return random.Random(s), s

    def n(self, count: int) -> int:
        """A count scaled by --scale (at least 1)."""
        return max(1, round(count * self.scale))

    def add(self, tree: str, family: str, base: str, variant: str, ext: str, data: bytes,
            seed: int | None = None, sparse_size: int | None = None) -> str:
        name = f"{family}__{base}__{variant}.{ext}".replace("/", "_")
        rel = f"{tree}/{family}/{name}"
        if rel in self.files:
            raise SystemExit(f"duplicate corpus name {rel}")
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if sparse_size is not None:
            with open(path, "wb") as f:
                f.write(data)
                f.truncate(sparse_size)
            size = sparse_size
        else:
            path.write_bytes(data)
            size = len(data)
        self.files[rel] = {"tree": tree, "source": f"{family}/{name}", "family": family,
                           "base": base, "variant": variant, "seed": seed, "bytes": size}
        return rel


# ----------------------------------------------------------------------------- generic mutations
def truncation_offsets(n: int, header_end: int, rng: random.Random, count: int) -> list[int]:
    """0, 1, 2, a few around the end of the header, fixed fractions, then seeded offsets."""
    offs = {0, 1, 2, 3, 4, 8, 16, max(0, header_end - 1), header_end, min(n - 1, header_end + 1),
            n // 4, n // 2, (3 * n) // 4, n - 2, n - 1}
    while len(offs) < count and len(offs) < n:
        offs.add(rng.randrange(0, n))
    return sorted(o for o in offs if 0 <= o < n)


def flip_bits(data: bytes, rng: random.Random, k: int, lo: int, hi: int) -> bytes:
    b = bytearray(data)
    hi = max(lo + 1, min(hi, len(b)))
    for _ in range(k):
        i = rng.randrange(lo, hi)
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def zero_range(data: bytes, rng: random.Random, lo: int, hi: int, fill: str) -> bytes:
    b = bytearray(data)
    hi = max(lo + 1, min(hi, len(b)))
    start = rng.randrange(lo, hi)
    length = min(len(b) - start, rng.choice([1, 2, 4, 16, 64, 256, 1024, 4096]))
    if fill == "zero":
        b[start:start + length] = bytes(length)
    elif fill == "ff":
        b[start:start + length] = b"\xff" * length
    else:
        b[start:start + length] = rng.randbytes(length)
    return bytes(b)


def generic(c: Corpus, tree: str, base: str, ext: str, data: bytes, header_end: int,
            counts: dict[str, int]) -> None:
    """Truncations, bit flips (header / body), zeroed, 0xFF-filled and random ranges."""
    n = len(data)
    if n < 8:
        return
    rng, _ = c.rng(f"{tree}:{base}:trunc-offsets")
    for off in truncation_offsets(n, header_end, rng, c.n(counts["trunc"])):
        c.add(tree, f"{'v' if tree == 'videos' else ''}trunc", base, f"at{off:08d}", ext, data[:off])
    body = min(header_end, n - 1)
    for where, lo, hi in (("hdr", 0, max(2, header_end)), ("body", body, n)):
        for i in range(c.n(counts["flip1"])):
            rng, s = c.rng(f"{tree}:{base}:flip1:{where}:{i}")
            c.add(tree, f"{'v' if tree == 'videos' else ''}bitflip1", base, f"{where}{i:03d}", ext,
                  flip_bits(data, rng, 1, lo, hi), s)
        for i in range(c.n(counts["flipn"])):
            rng, s = c.rng(f"{tree}:{base}:flipn:{where}:{i}")
            k = rng.choice([2, 3, 8, 32, 256])
            c.add(tree, f"{'v' if tree == 'videos' else ''}bitflipn", base, f"{where}{i:03d}k{k}",
                  ext, flip_bits(data, rng, k, lo, hi), s)
    for i in range(c.n(counts["range"])):
        rng, s = c.rng(f"{tree}:{base}:range:{i}")
        fill = ("zero", "ff", "random")[i % 3]
        lo, hi = (0, max(2, header_end)) if i % 2 == 0 else (body, n)
        c.add(tree, f"{'v' if tree == 'videos' else ''}range", base, f"{fill}{i:03d}", ext,
              zero_range(data, rng, lo, hi, fill), s)


# ----------------------------------------------------------------------------- JPEG
def jpeg_segments(data: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """(marker, start, end) for every segment from SOI up to and including the first SOS
    header; returns them and the offset where entropy-coded data starts (len if no SOS)."""
    segs = [(0xD8, 0, 2)]
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            break
        m = data[i + 1]
        if m == 0xFF:
            i += 1
            continue
        if m in (0xD8, 0x01) or 0xD0 <= m <= 0xD7:
            segs.append((m, i, i + 2))
            i += 2
            continue
        ln = struct.unpack(">H", data[i + 2:i + 4])[0]
        segs.append((m, i, i + 2 + ln))
        i += 2 + ln
        if m == 0xDA:
            return segs, i
    return segs, len(data)


def find(segs, marker):
    return [s for s in segs if s[0] == marker]


def patch(data: bytes, off: int, new: bytes) -> bytes:
    return data[:off] + new + data[off + len(new):]


def jpeg_edits(data: bytes, rng: random.Random) -> list[tuple[str, str, bytes]]:
    """(family, variant, bytes) for marker-level edits of one JPEG."""
    segs, scan = jpeg_segments(data)
    out: list[tuple[str, str, bytes]] = []
    sofs = [s for s in segs if s[0] in (0xC0, 0xC1, 0xC2)]
    if sofs:
        _, a, _ = sofs[0]
        # SOF: FF Cx len(2) P(1) Y(2) X(2) Nf(1) [C H/V Tq]*
        for h, w in ((0, 0), (0, 64), (64, 0), (65535, 65535), (65535, 1), (1, 65535),
                     (65000, 65000), (16384, 16384), (1, 1), (8, 8)):
            out.append(("jpeg_sof", f"dims{w}x{h}", patch(data, a + 5, struct.pack(">HH", h, w))))
        for p in (0, 1, 12, 16, 255):
            out.append(("jpeg_sof", f"precision{p}", patch(data, a + 4, bytes([p]))))
        for nf in (0, 2, 4, 255):
            out.append(("jpeg_sof", f"ncomp{nf}", patch(data, a + 9, bytes([nf]))))
        for hv in (0x00, 0xFF, 0x44, 0x13):
            out.append(("jpeg_sof", f"sampling{hv:02x}", patch(data, a + 11, bytes([hv]))))
        for tq in (3, 4, 255):
            out.append(("jpeg_sof", f"qtable{tq}", patch(data, a + 12, bytes([tq]))))
        for ln in (0, 1, 2, 8, 65535):
            out.append(("jpeg_sof", f"len{ln}", patch(data, a + 2, struct.pack(">H", ln))))
        for m in (0xC3, 0xC5, 0xC9, 0xCB, 0xCF, 0xF7):  # lossless, hierarchical, arithmetic, JPEG-LS
            out.append(("jpeg_sof", f"type{m:02x}", patch(data, a + 1, bytes([m]))))
        a2 = sofs[0]
        out.append(("jpeg_dup", "sof_twice", data[:a2[2]] + data[a2[1]:a2[2]] + data[a2[2]:]))
        out.append(("jpeg_missing", "no_sof", data[:a2[1]] + data[a2[2]:]))
    for k, (_, a, b) in enumerate(find(segs, 0xDB)[:2]):
        for ln in (0, 1, 2, 3, 66, 67, 68, 200, 65535):
            out.append(("jpeg_dqt", f"t{k}len{ln}", patch(data, a + 2, struct.pack(">H", ln))))
        for pq in (0x10, 0x04, 0xF0, 0x1F):
            out.append(("jpeg_dqt", f"t{k}pq{pq:02x}", patch(data, a + 4, bytes([pq]))))
        out.append(("jpeg_dqt", f"t{k}zeros", data[:a + 5] + bytes(b - a - 5) + data[b:]))
    out.append(("jpeg_missing", "no_dqt", b"".join(
        [data[:2]] + [data[s:e] for m, s, e in segs[1:] if m != 0xDB] + [data[scan:]])))
    for k, (_, a, b) in enumerate(find(segs, 0xC4)[:4]):
        for ln in (0, 1, 2, 3, 19, 20, 500, 65535):
            out.append(("jpeg_dht", f"t{k}len{ln}", patch(data, a + 2, struct.pack(">H", ln))))
        for tc in (0x02, 0x04, 0x20, 0xFF):
            out.append(("jpeg_dht", f"t{k}class{tc:02x}", patch(data, a + 4, bytes([tc]))))
        # code counts: all 255 (more codes than symbols), all 0, a single code of length 1
        out.append(("jpeg_dht", f"t{k}counts255", patch(data, a + 5, b"\xff" * 16)))
        out.append(("jpeg_dht", f"t{k}counts0", patch(data, a + 5, bytes(16))))
        out.append(("jpeg_dht", f"t{k}counts_over", patch(data, a + 5, b"\x02" + b"\x00" * 15)))
    out.append(("jpeg_missing", "no_dht", b"".join(
        [data[:2]] + [data[s:e] for m, s, e in segs[1:] if m != 0xC4] + [data[scan:]])))
    sos = find(segs, 0xDA)
    eoi = data.rfind(b"\xff\xd9")
    if sos:
        _, a, b = sos[0]
        out.append(("jpeg_missing", "no_sos", data[:a] + data[b:]))
        out.append(("jpeg_missing", "no_sos_no_scan", data[:a] + b"\xff\xd9"))
        out.append(("jpeg_missing", "headers_only", data[:a]))
        out.append(("jpeg_missing", "headers_sos_only", data[:b]))
        for ns in (0, 2, 4, 255):
            out.append(("jpeg_sos", f"ncomp{ns}", patch(data, a + 4, bytes([ns]))))
        for ln in (0, 2, 6, 65535):
            out.append(("jpeg_sos", f"len{ln}", patch(data, a + 2, struct.pack(">H", ln))))
        out.append(("jpeg_sos", "tables9", patch(data, a + 6, b"\x99")))
        out.append(("jpeg_sos", "spectral_bad", patch(data, b - 3, b"\x05\x02\xff")))
        out.append(("jpeg_dup", "sos_twice", data[:b] + data[a:b] + data[b:]))
        out.append(("jpeg_dup", "scan_twice", data[:eoi] + data[a:eoi] + data[eoi:] if eoi > b else data + data[a:]))
        # many copies of the whole scan (a progressive-like scan flood)
        if eoi > b and eoi - a < 20_000:
            out.append(("jpeg_dup", "scan_x50", data[:eoi] + data[a:eoi] * 50 + data[eoi:]))
        # a restart marker storm and stray markers inside the entropy data
        if eoi > b + 16:
            mid = (b + eoi) // 2
            out.append(("jpeg_markers", "rst_in_scan", data[:mid] + b"\xff\xd0\xff\xd3\xff\xd7" + data[mid:]))
            out.append(("jpeg_markers", "soi_in_scan", data[:mid] + b"\xff\xd8" + data[mid:]))
            out.append(("jpeg_markers", "eoi_mid_scan", data[:mid] + b"\xff\xd9" + data[mid:]))
            out.append(("jpeg_markers", "sof_in_scan", data[:mid] + data[sofs[0][1]:sofs[0][2]] + data[mid:] if sofs else data))
            out.append(("jpeg_markers", "ff00_flood", data[:mid] + b"\xff\x00" * 5000 + data[mid:]))
            out.append(("jpeg_markers", "ff_fill", data[:mid] + b"\xff" * 5000 + data[mid:]))
    out.append(("jpeg_dup", "soi_twice", data[:2] + data))
    dqt = find(segs, 0xDB)
    if dqt:
        out.append(("jpeg_dup", "dqt_x1000", data[:dqt[0][1]] + data[dqt[0][1]:dqt[0][2]] * 1000 + data[dqt[0][1]:]))
    if eoi > 0:
        out.append(("jpeg_missing", "no_eoi", data[:eoi]))
        out.append(("jpeg_missing", "no_eoi_trailing_garbage", data[:eoi] + rng.randbytes(3000)))
        out.append(("jpeg_markers", "trailing_jpeg", data + data))
    # APPn / COM with lying lengths and huge comments
    out.append(("jpeg_markers", "app1_len65535", data[:2] + b"\xff\xe1\xff\xffExif\x00\x00" + data[2:]))
    out.append(("jpeg_markers", "app1_len2", data[:2] + b"\xff\xe1\x00\x02" + data[2:]))
    out.append(("jpeg_markers", "app1_bad_exif", data[:2] + b"\xff\xe1\x00\x20Exif\x00\x00MM\x00\x2a\x00\x00\xff\xff" + bytes(14) + data[2:]))
    out.append(("jpeg_markers", "exif_ifd_loop", data[:2] + exif_loop() + data[2:]))
    out.append(("jpeg_markers", "com_x16", data[:2] + (b"\xff\xfe\xff\xff" + bytes(65533)) * 16 + data[2:]))
    out.append(("jpeg_markers", "dri_0", data[:2] + b"\xff\xdd\x00\x04\x00\x00" + data[2:]))
    out.append(("jpeg_markers", "dri_1", data[:2] + b"\xff\xdd\x00\x04\x00\x01" + data[2:]))
    out.append(("jpeg_markers", "dri_len0", data[:2] + b"\xff\xdd\x00\x00" + data[2:]))
    out.append(("jpeg_markers", "soi_only", b"\xff\xd8"))
    out.append(("jpeg_markers", "soi_eoi", b"\xff\xd8\xff\xd9"))
    out.append(("jpeg_markers", "soi_ff", b"\xff\xd8\xff"))
    out.append(("jpeg_markers", "soi_garbage", b"\xff\xd8\xff" + rng.randbytes(4000)))
    return out


def exif_loop() -> bytes:
    """An APP1 Exif block whose IFD0 points its next-IFD offset at itself (and an
    orientation of 9)."""
    tiff = bytearray(b"II*\x00\x08\x00\x00\x00")
    tiff += struct.pack("<H", 2)
    tiff += struct.pack("<HHII", 0x0112, 3, 1, 9)          # orientation 9 (invalid)
    tiff += struct.pack("<HHII", 0x8769, 4, 1, 8)          # ExifIFD pointer back to IFD0
    tiff += struct.pack("<I", 8)                           # next IFD: IFD0 again
    body = b"Exif\x00\x00" + bytes(tiff)
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


# ----------------------------------------------------------------------------- PNG
def png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, start, end) of each chunk (start at the length field)."""
    out = []
    i = 8
    while i + 12 <= len(data):
        ln = struct.unpack(">I", data[i:i + 4])[0]
        typ = data[i + 4:i + 8]
        end = i + 12 + ln
        out.append((typ, i, end))
        if typ == b"IEND" or end > len(data):
            break
        i = end
    return out


def chunk(typ: bytes, body: bytes, crc: int | None = None) -> bytes:
    c = zlib.crc32(typ + body) if crc is None else crc
    return struct.pack(">I", len(body)) + typ + body + struct.pack(">I", c & 0xFFFFFFFF)


def png_edits(data: bytes, rng: random.Random) -> list[tuple[str, str, bytes]]:
    out: list[tuple[str, str, bytes]] = []
    chunks = png_chunks(data)
    if not chunks or chunks[0][0] != b"IHDR":
        return out
    _, a, b = chunks[0]
    ihdr = bytearray(data[a + 8:b - 4])
    def with_ihdr(body: bytes, fix_crc: bool = True) -> bytes:
        crc = None if fix_crc else struct.unpack(">I", data[b - 4:b])[0]
        return data[:a] + chunk(b"IHDR", body, crc) + data[b:]
    for w, h in ((0, 0), (0, 16), (16, 0), (0x7FFFFFFF, 0x7FFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
                 (65535, 65535), (100000, 1), (1, 100000), (40000, 40000), (1, 1)):
        body = struct.pack(">II", w, h) + bytes(ihdr[8:])
        out.append(("png_ihdr", f"dims{w}x{h}", with_ihdr(body)))
    out.append(("png_ihdr", "dims65535_badcrc", with_ihdr(struct.pack(">II", 65535, 65535) + bytes(ihdr[8:]), False)))
    for depth in (0, 3, 5, 7, 32, 255):
        body = bytes(ihdr[:8]) + bytes([depth]) + bytes(ihdr[9:])
        out.append(("png_ihdr", f"depth{depth}", with_ihdr(body)))
    for ct in (1, 5, 7, 255):
        body = bytes(ihdr[:9]) + bytes([ct]) + bytes(ihdr[10:])
        out.append(("png_ihdr", f"colortype{ct}", with_ihdr(body)))
    for field, val in (("compression", 1), ("filter", 1), ("interlace", 1), ("interlace", 2)):
        i = {"compression": 10, "filter": 11, "interlace": 12}[field]
        body = bytearray(ihdr)
        body[i] = val
        out.append(("png_ihdr", f"{field}{val}", with_ihdr(bytes(body))))
    out.append(("png_ihdr", "short_ihdr", data[:a] + chunk(b"IHDR", bytes(ihdr[:9])) + data[b:]))
    out.append(("png_ihdr", "bad_crc", data[:b - 4] + b"\x00\x00\x00\x00" + data[b:]))
    out.append(("png_ihdr", "no_ihdr", data[:a] + data[b:]))
    out.append(("png_ihdr", "ihdr_twice", data[:b] + data[a:b] + data[b:]))
    out.append(("png_ihdr", "bad_signature", b"\x89PNG\r\n\x1a\x00" + data[8:]))
    idats = [ch for ch in chunks if ch[0] == b"IDAT"]
    if idats:
        _, ia, ib = idats[0]
        for ln in (0, 0x7FFFFFFF, 0xFFFFFFFF, (ib - ia - 12) + 1000):
            out.append(("png_chunks", f"idat_len{ln}", patch(data, ia, struct.pack(">I", ln))))
        out.append(("png_chunks", "no_idat", data[:8] + b"".join(data[s:e] for t, s, e in chunks if t != b"IDAT")))
        body = data[ia + 8:ib - 4]
        # zlib stream edits with a fixed CRC: garbage, a deflate bomb of zeros, truncated stream
        out.append(("png_chunks", "idat_garbage_fixedcrc", data[:ia] + chunk(b"IDAT", rng.randbytes(len(body))) + data[ib:]))
        out.append(("png_chunks", "idat_cut_fixedcrc", data[:ia] + chunk(b"IDAT", body[:len(body) // 3]) + data[ib:]))
        flipped = bytearray(body)
        for _ in range(4):
            j = rng.randrange(2, max(3, len(flipped)))
            flipped[j % len(flipped)] ^= 1 << rng.randrange(8)
        out.append(("png_chunks", "idat_flip_fixedcrc", data[:ia] + chunk(b"IDAT", bytes(flipped)) + data[ib:]))
        out.append(("png_chunks", "idat_extra_data", data[:ia] + chunk(b"IDAT", ZEROS_4M) + data[ib:]))
        if ib - ia < 20_000:
            out.append(("png_chunks", "idat_x50", data[:ia] + data[ia:ib] * 50 + data[ib:]))
        out.append(("png_chunks", "empty_idat_x100000", data[:ia] + chunk(b"IDAT", b"") * 100_000 + data[ia:]))
    ends = [ch for ch in chunks if ch[0] == b"IEND"]
    if ends:
        out.append(("png_chunks", "no_iend", data[:ends[0][1]]))
        out.append(("png_chunks", "after_iend", data + rng.randbytes(2000)))
    insert = chunks[0][2]
    for name, ch in (("plte_in_rgb", chunk(b"PLTE", bytes(768))),
                     ("plte_odd", chunk(b"PLTE", bytes(10))),
                     ("trns_huge", chunk(b"tRNS", bytes(2000))),
                     ("iccp_bomb", chunk(b"iCCP", b"icc\x00\x00" + ZEROS_50M)),
                     ("ztxt_bomb", chunk(b"zTXt", b"k\x00\x00" + ZEROS_50M)),
                     ("exif_loop", chunk(b"eXIf", exif_loop()[10:])),
                     ("unknown_critical", chunk(b"ABCD", b"1234")),
                     ("actl_bogus", chunk(b"acTL", struct.pack(">II", 0xFFFFFFFF, 0))),
                     ("chunk_len_huge", struct.pack(">I", 0x7FFFFFF0) + b"tEXt" + b"abc")):
        out.append(("png_chunks", name, data[:insert] + ch + data[insert:]))
    return out


# ----------------------------------------------------------------------------- GIF/WebP/BMP/TIFF
def gif_edits(data: bytes) -> list[tuple[str, str, bytes]]:
    out = []
    for w, h in ((0, 0), (65535, 65535), (1, 65535)):
        out.append(("gif", f"screen{w}x{h}", patch(data, 6, struct.pack("<HH", w, h))))
    gct = (data[10] & 0x80) and 3 * (2 << (data[10] & 7))
    j = data.find(b"\x2c", 13 + gct)
    if j > 0:
        for w, h in ((0, 0), (65535, 65535)):
            out.append(("gif", f"frame{w}x{h}", patch(data, j + 5, struct.pack("<HH", w, h))))
        out.append(("gif", "frame_offset_huge", patch(data, j + 1, struct.pack("<HH", 65000, 65000))))
        out.append(("gif", "lzw_min_code0", patch(data, j + 10, b"\x00")))
        out.append(("gif", "lzw_min_code12", patch(data, j + 10, b"\x0c")))
    out.append(("gif", "no_trailer", data[:-1]))
    out.append(("gif", "bad_version", b"GIF87b" + data[6:]))
    out.append(("gif", "header_only", data[:13 + gct]))
    return out


def webp_edits(data: bytes) -> list[tuple[str, str, bytes]]:
    out = []
    out.append(("webp", "riff_size0", patch(data, 4, struct.pack("<I", 0))))
    out.append(("webp", "riff_size_huge", patch(data, 4, struct.pack("<I", 0xFFFFFFF0))))
    out.append(("webp", "chunk_size_huge", patch(data, 16, struct.pack("<I", 0xFFFFFFF0))))
    fourcc = data[12:16]
    if fourcc == b"VP8 ":
        # frame header: 3-byte tag, start code 9d 01 2a, then 14-bit width/height + scale
        out.append(("webp", "vp8_dims16383", patch(data, 26, struct.pack("<HH", 0x3FFF, 0x3FFF))))
        out.append(("webp", "vp8_dims0", patch(data, 26, struct.pack("<HH", 0, 0))))
        out.append(("webp", "vp8_bad_start", patch(data, 23, b"\x00\x00\x00")))
    elif fourcc == b"VP8L":
        out.append(("webp", "vp8l_dims16384", patch(data, 21, struct.pack("<I", 0x0FFFFFFF))))
        out.append(("webp", "vp8l_dims0", patch(data, 21, struct.pack("<I", 0))))
        out.append(("webp", "vp8l_bad_sig", patch(data, 20, b"\x00")))
    out.append(("webp", "vp8x_huge_canvas", data[:12] + b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + b"\xff\xff\xff\xff\xff\xff" + data[12:]))
    out.append(("webp", "riff_only", data[:12]))
    out.append(("webp", "anim_bogus", data[:12] + b"VP8X" + struct.pack("<I", 10) + b"\x02\x00\x00\x00" + bytes(6) + b"ANIM" + struct.pack("<I", 6) + bytes(6) + b"ANMF" + struct.pack("<I", 0xFFFFFF00)))
    return out


def bmp_edits(data: bytes) -> list[tuple[str, str, bytes]]:
    out = []
    for w, h in ((0, 0), (65535, 65535), (0x7FFFFFFF, 1), (1, 0x7FFFFFFF), (-64, 32), (64, -0x7FFFFFFF)):
        out.append(("bmp", f"dims{w}x{h}", patch(data, 18, struct.pack("<ii", w, h))))
    for bpp in (0, 3, 7, 64, 65535):
        out.append(("bmp", f"bpp{bpp}", patch(data, 28, struct.pack("<H", bpp))))
    for comp in (1, 2, 3, 4, 5, 99):
        out.append(("bmp", f"compression{comp}", patch(data, 30, struct.pack("<I", comp))))
    out.append(("bmp", "offset_past_end", patch(data, 10, struct.pack("<I", 0xFFFFFF00))))
    out.append(("bmp", "offset0", patch(data, 10, struct.pack("<I", 0))))
    out.append(("bmp", "header_size_huge", patch(data, 14, struct.pack("<I", 0xFFFFFFF0))))
    out.append(("bmp", "header_size0", patch(data, 14, struct.pack("<I", 0))))
    out.append(("bmp", "colors_used_huge", patch(data, 46, struct.pack("<I", 0xFFFFFFFF))))
    out.append(("bmp", "planes0", patch(data, 26, struct.pack("<H", 0))))
    return out


def tiff_edits(data: bytes) -> list[tuple[str, str, bytes]]:
    out = []
    le = data[:2] == b"II"
    e = "<" if le else ">"
    ifd = struct.unpack(e + "I", data[4:8])[0]
    if ifd + 2 > len(data):
        return out
    n = struct.unpack(e + "H", data[ifd:ifd + 2])[0]
    tags = {}
    for k in range(n):
        o = ifd + 2 + 12 * k
        tag, typ, cnt = struct.unpack(e + "HHI", data[o:o + 8])
        tags[tag] = (o, typ, cnt)
    def set_val(tag: int, val: int, name: str) -> None:
        if tag in tags:
            o, typ, _ = tags[tag]
            v = struct.pack(e + ("H" if typ == 3 else "I"), val) + (b"\x00\x00" if typ == 3 else b"")
            out.append(("tiff", name, patch(data, o + 8, v)))
    set_val(256, 0, "width0")
    set_val(257, 0, "length0")
    set_val(256, 65535, "width65535")
    set_val(257, 65535, "length65535")
    set_val(259, 99, "compression99")
    set_val(259, 7, "compression_jpeg")
    set_val(259, 5, "compression_lzw")
    set_val(258, 0, "bits0")
    set_val(258, 77, "bits77")
    set_val(277, 0, "spp0")
    set_val(277, 200, "spp200")
    set_val(273, 0xFFFFFF00, "stripoffset_huge")
    set_val(279, 0xFFFFFF00, "stripbytes_huge")
    set_val(278, 0, "rowsperstrip0")
    set_val(262, 99, "photometric99")
    # IFD loops: next-IFD offset pointing at IFD0 itself
    nxt = ifd + 2 + 12 * n
    if nxt + 4 <= len(data):
        out.append(("tiff", "ifd_loop", patch(data, nxt, struct.pack(e + "I", ifd))))
        out.append(("tiff", "ifd_next_huge", patch(data, nxt, struct.pack(e + "I", 0xFFFFFFF0))))
    out.append(("tiff", "ifd_offset_huge", patch(data, 4, struct.pack(e + "I", 0xFFFFFFF0))))
    out.append(("tiff", "ifd_offset0", patch(data, 4, struct.pack(e + "I", 0))))
    out.append(("tiff", "ifd_count_huge", patch(data, ifd, struct.pack(e + "H", 0xFFFF))))
    out.append(("tiff", "ifd_count0", patch(data, ifd, struct.pack(e + "H", 0))))
    out.append(("tiff", "bigtiff_magic", data[:2] + struct.pack(e + "H", 43) + data[4:]))
    return out


# ----------------------------------------------------------------------------- image bases
def load_rgb(path: Path, long_side: int) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        im = im.convert("RGB")
    w, h = im.size
    s = long_side / max(w, h)
    if s < 1:
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
    return Image.frombytes("RGB", im.size, im.tobytes())


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def image_bases() -> dict[str, list[tuple[str, str, bytes]]]:
    """By format: (base name, extension, bytes). Small derived copies keep the run fast; a few
    bundled files are used as they are."""
    photos = sorted(p for p in PHOTOS.iterdir() if p.suffix in (".png", ".jpg"))
    bases: dict[str, list[tuple[str, str, bytes]]] = {k: [] for k in
                                                      ("jpeg", "png", "gif", "webp", "bmp", "tiff")}
    for p in photos:
        im = load_rgb(p, 160)
        stem = p.stem
        bases["jpeg"].append((f"{stem}160", "jpg", encode(im, "JPEG", quality=85)))
        bases["png"].append((f"{stem}160", "png", encode(im, "PNG")))
    for p in photos[:4]:
        im = load_rgb(p, 160)
        stem = p.stem
        bases["jpeg"].append((f"{stem}160prog", "jpg", encode(im, "JPEG", quality=85, progressive=True)))
        bases["jpeg"].append((f"{stem}160rst", "jpg", encode(im, "JPEG", quality=50, restart_marker_blocks=1)))
        bases["jpeg"].append((f"{stem}160gray", "jpg", encode(im.convert("L"), "JPEG", quality=75)))
        bases["gif"].append((f"{stem}160", "gif", encode(im.convert("P"), "GIF")))
        bases["webp"].append((f"{stem}160lossy", "webp", encode(im, "WEBP", quality=70)))
        bases["webp"].append((f"{stem}160lossless", "webp", encode(im, "WEBP", lossless=True)))
        bases["bmp"].append((f"{stem}160", "bmp", encode(im, "BMP")))
        bases["tiff"].append((f"{stem}160", "tif", encode(im, "TIFF")))
        bases["png"].append((f"{stem}160pal", "png", encode(im.convert("P"), "PNG")))
        bases["png"].append((f"{stem}160la", "png", encode(im.convert("LA"), "PNG")))
    for name in ("progressive.jpg", "cmyk.jpg", "exif_orient6.jpg", "yuv444.jpg", "gray.jpg",
                 "comment.jpg", "wide.jpg"):
        bases["jpeg"].append((Path(name).stem, "jpg", (ODD / name).read_bytes()))
    for name in ("rocket.jpg", "retina.jpg"):
        bases["jpeg"].append((Path(name).stem + "full", "jpg", (PHOTOS / name).read_bytes()))
    for name in ("rgba.png", "gray16.png", "palette_trns.png", "la.png", "rgb16.png", "one_pixel.png"):
        bases["png"].append((Path(name).stem, "png", (ODD / name).read_bytes()))
    bases["png"].append(("horsefull", "png", (PHOTOS / "horse.png").read_bytes()))
    bases["gif"].append(("animated", "gif", (ODD / "animated.gif").read_bytes()))
    for name in ("lossless.webp", "lossy.webp"):
        bases["webp"].append((Path(name).stem, "webp", (ODD / name).read_bytes()))
    bases["bmp"].append(("photo", "bmp", (ODD / "photo.bmp").read_bytes()))
    bases["tiff"].append(("photo", "tif", (ODD / "photo.tif").read_bytes()))
    return bases


def header_end(fmt: str, data: bytes) -> int:
    if fmt == "jpeg":
        return jpeg_segments(data)[1]
    if fmt == "png":
        idat = data.find(b"IDAT")
        return idat - 4 if idat > 0 else 33
    return {"gif": 13, "webp": 30, "bmp": 54, "tiff": 8}.get(fmt, 16)


def gen_images(c: Corpus) -> None:
    bases = image_bases()
    counts = {"jpeg": dict(trunc=40, flip1=14, flipn=10, range=14),
              "png": dict(trunc=30, flip1=10, flipn=8, range=10)}
    other = dict(trunc=20, flip1=6, flipn=5, range=6)
    for fmt, items in bases.items():
        for base, ext, data in items:
            generic(c, "images", base, ext, data, header_end(fmt, data), counts.get(fmt, other))
            rng, s = c.rng(f"images:{base}:edits")
            if fmt == "jpeg":
                edits = jpeg_edits(data, rng)
            elif fmt == "png":
                edits = png_edits(data, rng)
            else:
                edits = {"gif": gif_edits, "webp": webp_edits, "bmp": bmp_edits,
                         "tiff": tiff_edits}[fmt](data)
            for family, variant, blob in edits:
                c.add("images", family, base, variant, ext, blob, s)
    # the bundled bad fixtures, as they are and with a twist
    for p in sorted(BAD.iterdir()):
        if p.name == "README.md":
            continue
        c.add("images", "fixture_bad", p.stem, "asis", p.suffix.lstrip(".") or "bin", p.read_bytes())
    swaps(c, bases)
    misc(c, "images")
    bombs(c)


def png_zeros(width: int, height: int, color_type: int, channels: int) -> bytes:
    """A valid 8-bit PNG of zero pixels, its rows streamed through zlib (never held whole)."""
    z = zlib.compressobj(9)
    row = bytes(1 + width * channels)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bombs(c: Corpus) -> None:
    """Valid images just under the default --max-pixels (178,956,970): they decode, slowly and
    with a large buffer, so they are the corpus's slowest items and its memory peak."""
    c.add("images", "bombs", "zeros", "png_gray_13000x13000", "png", png_zeros(13000, 13000, 0, 1))
    c.add("images", "bombs", "zeros", "png_rgb_12000x12000", "png", png_zeros(12000, 12000, 2, 3))
    flat = Image.new("L", (13000, 13000), 128)
    c.add("images", "bombs", "flat", "jpeg_gray_13000x13000", "jpg", encode(flat, "JPEG", quality=50))
    c.add("images", "bombs", "flat", "jpeg_gray_13000x13000_progressive", "jpg",
          encode(flat, "JPEG", quality=50, progressive=True))
    del flat
    rgb = Image.new("RGB", (12000, 12000), (120, 60, 200))
    c.add("images", "bombs", "flat", "jpeg_rgb444_12000x12000_progressive", "jpg",
          encode(rgb, "JPEG", quality=50, progressive=True, subsampling=0))
    c.add("images", "bombs", "flat", "gif_6000x6000", "gif", encode(rgb.resize((6000, 6000)).convert("P"), "GIF"))
    del rgb


def swaps(c: Corpus, bases) -> None:
    """Container swaps: a format under another's extension, videos in the images tree."""
    exts = ["jpg", "png", "gif", "webp", "bmp", "tif", "jpeg", "heic", "avif", "ppm", "bin", "mp4", "noext"]
    for fmt, items in bases.items():
        for base, ext, data in items[:3]:
            for e in exts:
                if e == ext:
                    continue
                c.add("images", "swap", base, f"{fmt}_as_{e}", e if e != "noext" else "x", data)
    for p in sorted(VIDEOS.iterdir()):
        if p.suffix in (".mp4", ".mkv", ".avi") and p.stat().st_size < 100_000:
            for e in ("jpg", "png", "webp", "gif"):
                c.add("images", "swap", p.stem, f"video_{p.suffix[1:]}_as_{e}", e, p.read_bytes())


def misc(c: Corpus, tree: str) -> None:
    exts = ("jpg", "png", "gif", "webp") if tree == "images" else ("mp4", "mkv", "webm", "mov", "avi")
    fam = "misc" if tree == "images" else "vmisc"
    for e in exts:
        c.add(tree, fam, "empty", "zero_bytes", e, b"")
        c.add(tree, fam, "text", "plain", e, TEXT)
        c.add(tree, fam, "html", "page404", e, HTML)
        c.add(tree, fam, "utf16", "bom", e, "\ufeffnot media\n".encode("utf-16"))
        c.add(tree, fam, "nul", "4096", e, bytes(4096))
        c.add(tree, fam, "ff", "4096", e, b"\xff" * 4096)
        c.add(tree, fam, "onebyte", "ff", e, b"\xff")
        c.add(tree, fam, "sparse", "64mib_zeros", e, b"", sparse_size=64 << 20)
        for i in range(c.n(12)):
            rng, s = c.rng(f"{tree}:random:{e}:{i}")
            n = rng.choice([1, 2, 7, 100, 1000, 4096, 65536, 300_000])
            c.add(tree, fam, "random", f"{i:03d}n{n}", e, rng.randbytes(n), s)
    # magic bytes then random (every signature the sniffers know)
    magics = {"jpeg": b"\xff\xd8\xff\xe0", "png": b"\x89PNG\r\n\x1a\n", "gif": b"GIF89a",
              "webp": b"RIFF\x00\x10\x00\x00WEBPVP8 ", "bmp": b"BM", "tiff_le": b"II*\x00",
              "tiff_be": b"MM\x00*", "ftyp": b"\x00\x00\x00\x18ftypisom", "ebml": b"\x1a\x45\xdf\xa3",
              "riff_avi": b"RIFF\x00\x10\x00\x00AVI LIST", "heic": b"\x00\x00\x00\x18ftypheic",
              "ppm": b"P6\n", "mpegts": b"\x47\x40\x00\x10", "annexb": b"\x00\x00\x00\x01\x67"}
    for name, m in magics.items():
        for i in range(c.n(3)):
            rng, s = c.rng(f"{tree}:magic:{name}:{i}")
            c.add(tree, fam, f"magic_{name}", f"{i:02d}", exts[i % len(exts)],
                  m + rng.randbytes(rng.choice([0, 10, 1000, 20000])), s)


# ----------------------------------------------------------------------------- MP4 boxes
def boxes(data: bytes, start: int = 0, end: int | None = None, depth: int = 0,
          path: str = "") -> list[tuple[str, int, int, int]]:
    """(path, start, header length, end) of every box, recursing into containers."""
    containers = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"udta", b"dinf", b"mvex",
                  b"moof", b"traf"}
    end = len(data) if end is None else end
    out = []
    i = start
    while i + 8 <= end:
        size, typ = struct.unpack(">I4s", data[i:i + 8])
        hdr = 8
        if size == 1 and i + 16 <= end:
            size = struct.unpack(">Q", data[i + 8:i + 16])[0]
            hdr = 16
        elif size == 0:
            size = end - i
        if size < hdr or i + size > end:
            break
        p = f"{path}/{typ.decode('latin-1')}"
        out.append((p, i, hdr, i + size))
        if typ in containers and depth < 8:
            out += boxes(data, i + hdr, i + size, depth + 1, p)
        elif typ == b"stsd":
            out += boxes(data, i + hdr + 8, i + size, depth + 1, p)
        elif typ in (b"avc1", b"avc3", b"hvc1", b"mp4v"):   # visual sample entry: 78 bytes
            out += boxes(data, i + hdr + 78, i + size, depth + 1, p)
        i += size
    return out


def mp4_edits(data: bytes, rng: random.Random) -> list[tuple[str, str, bytes]]:
    out: list[tuple[str, str, bytes]] = []
    bx = boxes(data)
    by = {}
    for p, s, h, e in bx:
        by.setdefault(p.rsplit("/", 1)[-1], []).append((p, s, h, e))
    def remove(name):
        for p, s, h, e in by.get(name, [])[:1]:
            out.append(("vbox", f"no_{name}", data[:s] + data[e:]))
    for name in ("moov", "mdat", "ftyp", "trak", "stbl", "stsd", "stsz", "stco", "stss", "avcC", "mvhd", "mdhd", "hdlr"):
        remove(name)
    for name in ("moov", "mdat", "trak", "stsd", "avcC", "stsz", "stco"):
        for p, s, h, e in by.get(name, [])[:1]:
            for size in (0, 1, 7, 8, 0xFFFFFFFF, e - s + 1000):
                out.append(("vbox", f"{name}_size{size}", patch(data, s, struct.pack(">I", size))))
            out.append(("vbox", f"{name}_renamed", patch(data, s + 4, b"free")))
            out.append(("vbox", f"{name}_twice", data[:e] + data[s:e] + data[e:]))
            if name in ("moov", "mdat"):
                out.append(("vbox", f"{name}_largesize_huge", data[:s] + struct.pack(">I4sQ", 1, data[s + 4:s + 8], 0xFFFFFFFFFFFFFF00) + data[s + 8:]))
    for name, off, vals in (("stsz", 16, (0xFFFFFFFF, 0x10000000)), ("stco", 12, (0xFFFFFFFF, 0x10000000)),
                            ("stts", 12, (0xFFFFFFFF,)), ("stsc", 12, (0xFFFFFFFF,)),
                            ("stss", 12, (0xFFFFFFFF,)), ("ctts", 12, (0xFFFFFFFF,)),
                            ("elst", 12, (0xFFFFFFFF,))):
        for p, s, h, e in by.get(name, [])[:1]:
            for v in vals:
                out.append(("vbox", f"{name}_count{v:x}", patch(data, s + off, struct.pack(">I", v))))
    for p, s, h, e in by.get("stco", [])[:1]:
        cnt = struct.unpack(">I", data[s + 12:s + 16])[0]
        body = b"".join(struct.pack(">I", 0xFFFFFF00 - k) for k in range(cnt))
        out.append(("vbox", "stco_past_eof", data[:s + 16] + body + data[s + 16 + 4 * cnt:]))
        body = b"".join(struct.pack(">I", 0) for k in range(cnt))
        out.append(("vbox", "stco_zero", data[:s + 16] + body + data[s + 16 + 4 * cnt:]))
    for p, s, h, e in by.get("stsz", [])[:1]:
        cnt = struct.unpack(">I", data[s + 16:s + 20])[0]
        body = b"".join(struct.pack(">I", 0x7FFFFFFF) for k in range(cnt))
        out.append(("vbox", "stsz_huge_samples", data[:s + 20] + body + data[s + 20 + 4 * cnt:]))
        out.append(("vbox", "stsz_uniform_huge", patch(data, s + 12, struct.pack(">I", 0x7FFFFFFF))))
    for p, s, h, e in by.get("mdhd", [])[:1]:
        v = data[s + 8]
        ts = s + 20 if v == 0 else s + 28
        out.append(("vbox", "mdhd_timescale0", patch(data, ts, struct.pack(">I", 0))))
        out.append(("vbox", "mdhd_duration_huge", patch(data, ts + 4, struct.pack(">I", 0xFFFFFFFF))))
    for p, s, h, e in by.get("mvhd", [])[:1]:
        out.append(("vbox", "mvhd_timescale0", patch(data, s + 20, struct.pack(">I", 0))))
    for p, s, h, e in by.get("stts", [])[:1]:
        if e - s >= 24:
            out.append(("vbox", "stts_delta0", patch(data, s + 20, struct.pack(">I", 0))))
            out.append(("vbox", "stts_count_huge_delta0", patch(data, s + 16, struct.pack(">II", 0xFFFFFFFF, 0))))
    # huge dimensions: tkhd (16.16 at the end), the avc1 sample entry, the SPS
    for t, (p, s, h, e) in enumerate(by.get("tkhd", [])[:2]):
        for w, hh in ((0, 0), (65535, 65535), (32767, 1)):
            out.append(("vdims", f"tkhd{t}_{w}x{hh}", patch(data, e - 8, struct.pack(">II", w << 16, hh << 16))))
    for name in ("avc1", "avc3", "mp4v", "hvc1"):
        for p, s, h, e in by.get(name, [])[:1]:
            for w, hh in ((0, 0), (65535, 65535), (8192, 8192), (1, 1)):
                out.append(("vdims", f"stsd_{name}{w}x{hh}", patch(data, s + 32, struct.pack(">HH", w, hh))))
            out.append(("vbox", f"{name}_renamed_fourcc", patch(data, s + 4, b"zzzz")))
    for p, s, h, e in by.get("avcC", [])[:1]:
        body = data[s + 8:e]
        if len(body) > 8 and body[5] & 0x1F:
            ln = struct.unpack(">H", body[6:8])[0]
            sps = body[8:8 + ln]
            for w, hh in SPS_DIMS:
                new = sps_with_dims(sps, w, hh)
                if new is None or len(new) != len(sps):
                    new2 = new
                    if new2 is None:
                        continue
                    # a different length: rebuild avcC and fix the sizes of its parents
                    nb = body[:6] + struct.pack(">H", len(new2)) + new2 + body[8 + ln:]
                    out.append(("vdims", f"sps{w}x{hh}", resize_box(data, bx, s, e, chunk_box(b"avcC", nb))))
                else:
                    out.append(("vdims", f"sps{w}x{hh}", patch(data, s + 16, new)))
            out.append(("vdims", "avcc_sps_len_huge", patch(data, s + 14, struct.pack(">H", 0xFFFF))))
            out.append(("vdims", "avcc_nsps31", patch(data, s + 13, bytes([0xE0 | 31]))))
            out.append(("vdims", "avcc_nalsize_len3", patch(data, s + 12, bytes([0xFC | 2]))))
    return out


# SPS sizes: just over the 4096x2304 default limit, FFmpeg-valid but huge, FFmpeg-invalid, and
# 0x0 written as the largest macroblock counts (0x7FFFF + 1 macroblocks a side)
SPS_DIMS = ((4112, 2304), (8192, 8192), (16384, 16384), (65536, 65536), (1 << 20, 16), (0, 0))


def chunk_box(typ: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body) + 8) + typ + body


def resize_box(data: bytes, bx, s: int, e: int, new: bytes) -> bytes:
    """Replace the box [s, e) with `new`, fixing the 32-bit sizes of its enclosing boxes (and
    the chunk offsets in stco when the mdat comes after moov)."""
    delta = len(new) - (e - s)
    b = bytearray(data[:s] + new + data[e:])
    for p, bs, h, be in bx:
        if bs < s and be >= e and h == 8:
            size = struct.unpack(">I", data[bs:bs + 4])[0]
            b[bs:bs + 4] = struct.pack(">I", size + delta)
    mdat = [x for x in bx if x[0] == "/mdat"]
    if mdat and mdat[0][1] > s:
        for p, bs, h, be in bx:
            if p.endswith("/stco"):
                cnt = struct.unpack(">I", data[bs + 12:bs + 16])[0]
                for k in range(cnt):
                    o = bs + 16 + 4 * k
                    v = struct.unpack(">I", data[o:o + 4])[0]
                    o2 = o + (delta if o > s else 0)
                    b[o2:o2 + 4] = struct.pack(">I", v + delta)
    return bytes(b)


class Bits:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def u(self, n: int) -> int:
        v = 0
        for _ in range(n):
            byte = self.data[self.pos >> 3]
            v = (v << 1) | ((byte >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return v

    def ue(self) -> int:
        z = 0
        while self.u(1) == 0:
            z += 1
            if z > 31:
                raise ValueError("bad exp-golomb")
        return (1 << z) - 1 + self.u(z)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


class BitWriter:
    def __init__(self):
        self.bits: list[int] = []

    def u(self, n: int, v: int) -> None:
        self.bits += [(v >> (n - 1 - i)) & 1 for i in range(n)]

    def ue(self, v: int) -> None:
        v += 1
        n = v.bit_length()
        self.u(n - 1, 0)
        self.u(n, v)

    def bytes(self) -> bytes:
        bits = self.bits + [0] * (-len(self.bits) % 8)
        return bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))


def unescape(nal: bytes) -> bytes:
    return nal.replace(b"\x00\x00\x03", b"\x00\x00")


def escape(rbsp: bytes) -> bytes:
    out = bytearray()
    zeros = 0
    for b in rbsp:
        if zeros >= 2 and b <= 3:
            out.append(3)
            zeros = 0
        out.append(b)
        zeros = zeros + 1 if b == 0 else 0
    return bytes(out)


def sps_with_dims(sps: bytes, width: int, height: int) -> bytes | None:
    """The SPS NAL (with its header byte) with pic_width/height_in_mbs rewritten; frame
    cropping dropped. None when the SPS uses features this rewrite does not follow."""
    try:
        r = Bits(unescape(sps))
        w = BitWriter()
        w.u(8, r.u(8))                     # NAL header
        profile = r.u(8)
        w.u(8, profile)
        w.u(16, r.u(16))                   # constraints + level
        w.ue(r.ue())                       # sps id
        if profile in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
            cf = r.ue()
            w.ue(cf)
            if cf == 3:
                w.u(1, r.u(1))
            w.ue(r.ue())
            w.ue(r.ue())
            w.u(1, r.u(1))
            scaling = r.u(1)
            if scaling:
                return None
            w.u(1, 0)
        w.ue(r.ue())                       # log2_max_frame_num
        poc = r.ue()
        w.ue(poc)
        if poc == 0:
            w.ue(r.ue())
        elif poc == 1:
            return None
        w.ue(r.ue())                       # max_num_ref_frames
        w.u(1, r.u(1))                     # gaps
        r.ue()
        r.ue()
        w.ue(max(0, width // 16 - 1) if width else 0x7FFFF)
        w.ue(max(0, height // 16 - 1) if height else 0x7FFFF)
        frame_mbs_only = r.u(1)
        w.u(1, frame_mbs_only)
        if not frame_mbs_only:
            w.u(1, r.u(1))
        w.u(1, r.u(1))                     # direct_8x8
        if r.u(1):                         # cropping: drop it
            for _ in range(4):
                r.ue()
        w.u(1, 0)
        r.u(1)                             # vui_parameters_present: drop the VUI
        w.u(1, 0)
        w.u(1, 1)                          # rbsp stop bit
        return escape(w.bytes())
    except (ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------- videos
def ffmpeg(args: list[str], tmp: Path) -> bool:
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y"] + args
    try:
        r = subprocess.run(cmd, cwd=tmp, capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def video_bases(tmp: Path) -> list[tuple[str, str, bytes]]:
    """(base, ext, bytes): the small bundled clips as they are plus 1-2 s variants in other
    containers and codecs made with the ffmpeg CLI (bit-exact flags, no metadata)."""
    out = []
    for p in sorted(VIDEOS.iterdir()):
        if p.suffix in (".mp4", ".mkv", ".avi") and p.stat().st_size < 100_000:
            out.append((p.stem, p.suffix[1:], p.read_bytes()))
    if shutil.which("ffmpeg") is None:
        print("ffmpeg not found: only the bundled clips are mutated", file=sys.stderr)
        return out
    src = str(VIDEOS / "carphone_pristine.mp4")
    be = ["-fflags", "+bitexact", "-flags:v", "+bitexact", "-map_metadata", "-1", "-threads", "1"]
    x264 = ["-c:v", "libx264", "-preset", "ultrafast", "-x264-params", "threads=1", "-pix_fmt", "yuv420p"]
    variants = [
        ("cp_mp4", "mp4", ["-t", "1.5", "-i", src] + x264 + be + ["-an"]),
        ("cp_faststart", "mp4", ["-t", "1.5", "-i", src] + x264 + be + ["-an", "-movflags", "+faststart"]),
        ("cp_frag", "mp4", ["-t", "1.5", "-i", src] + x264 + be + ["-an", "-movflags", "+frag_keyframe+empty_moov", "-g", "10"]),
        ("cp_mov", "mov", ["-t", "1.5", "-i", src] + x264 + be + ["-an"]),
        ("cp_mkv", "mkv", ["-t", "1.5", "-i", src] + x264 + be + ["-an"]),
        ("cp_vp8", "webm", ["-t", "1", "-i", src, "-c:v", "libvpx", "-b:v", "200k", "-threads", "1"] + be + ["-an"]),
        ("cp_vp9", "webm", ["-t", "1", "-i", src, "-c:v", "libvpx-vp9", "-b:v", "200k", "-deadline", "realtime", "-cpu-used", "8", "-threads", "1"] + be + ["-an"]),
        ("cp_mpeg4", "avi", ["-t", "1.5", "-i", src, "-c:v", "mpeg4", "-q:v", "5"] + be + ["-an"]),
        ("cp_mjpeg", "avi", ["-t", "1", "-i", src, "-c:v", "mjpeg", "-q:v", "5", "-pix_fmt", "yuvj420p"] + be + ["-an"]),
        ("cp_ts", "ts", ["-t", "1.5", "-i", src] + x264 + be + ["-an"]),
        ("cp_annexb", "h264", ["-t", "1.5", "-i", src] + x264 + be + ["-an", "-f", "h264"]),
        ("cp_flv", "flv", ["-t", "1.5", "-i", src] + x264 + be + ["-an"]),
        ("cp_mpg", "mpg", ["-t", "1", "-i", src, "-c:v", "mpeg2video", "-q:v", "5"] + be + ["-an"]),
    ]
    for base, ext, args in variants:
        dst = tmp / f"{base}.{ext}"
        if ffmpeg(args + [str(dst)], tmp) and dst.stat().st_size > 0:
            out.append((base, ext, dst.read_bytes()))
        else:
            print(f"ffmpeg could not make {base}.{ext}; skipped", file=sys.stderr)
    return out


def container_header_end(ext: str, data: bytes) -> int:
    if ext in ("mp4", "mov"):
        for p, s, h, e in boxes(data):
            if p == "/mdat":
                return s + h if s > 64 else 64
        return 64
    return min(len(data) // 20 + 32, 4096)


def gen_videos(c: Corpus, tmp: Path) -> None:
    bases = video_bases(tmp)
    counts = dict(trunc=14, flip1=3, flipn=3, range=3)
    for base, ext, data in bases:
        generic(c, "videos", base, ext, data, container_header_end(ext, data), counts)
        rng, s = c.rng(f"videos:{base}:edits")
        if ext in ("mp4", "mov"):
            for family, variant, blob in mp4_edits(data, rng):
                c.add("videos", family, base, variant, ext, blob, s)
        if ext == "h264":
            edits = annexb_edits(data)
            for family, variant, blob in edits:
                c.add("videos", family, base, variant, ext, blob, s)
                # the same SPS edit muxed into MP4 by the CLI (it trusts the SPS)
                if family == "vdims":
                    src = tmp / f"{base}_{variant}.h264"
                    src.write_bytes(blob)
                    dst = tmp / f"{base}_{variant}.mp4"
                    if ffmpeg(["-f", "h264", "-i", src.name, "-c", "copy", "-fflags", "+bitexact",
                               "-map_metadata", "-1", dst.name], tmp):
                        c.add("videos", family, base, f"{variant}_muxed", "mp4", dst.read_bytes(), s)
    for p in sorted(VIDEOS_BAD.iterdir()):
        if p.name != "README.md":
            c.add("videos", "fixture_bad", p.stem, "asis", p.suffix.lstrip("."), p.read_bytes())
    playlists(c, bases)
    vswaps(c)
    misc(c, "videos")


def annexb_edits(data: bytes) -> list[tuple[str, str, bytes]]:
    out = []
    i = data.find(b"\x00\x00\x00\x01\x67")
    if i < 0:
        return out
    j = data.find(b"\x00\x00\x01", i + 5)
    sps = data[i + 4:j if j > 0 else len(data)]
    if sps.endswith(b"\x00"):
        sps = sps[:-1]
        j -= 1 if j > 0 else 0
    for w, h in SPS_DIMS:
        new = sps_with_dims(sps, w, h)
        if new is not None:
            out.append(("vdims", f"sps{w}x{h}", data[:i + 4] + new + data[i + 4 + len(sps):]))
    out.append(("vnal", "sps_removed", data[:i] + data[i + 4 + len(sps):]))
    out.append(("vnal", "start_codes_only", b"\x00\x00\x00\x01" * 4000))
    out.append(("vnal", "ends_in_start_code", data + b"\x00\x00\x01"))
    out.append(("vnal", "ends_in_00_00_01_sps", data[:i + 4 + len(sps)] + b"\x00\x00\x01"))
    out.append(("vnal", "sps_x1000", data[:i] + (data[i:i + 4 + len(sps)]) * 1000 + data[i:]))
    out.append(("vnal", "emulation_bytes", data[:len(data) // 2] + b"\x00\x00\x03" * 3000 + data[len(data) // 2:]))
    return out


def playlists(c: Corpus, bases) -> None:
    """Text formats FFmpeg opens other files from: HLS and ffconcat, named as videos."""
    real = VIDEOS / "carphone_pristine.mp4"
    target_abs = str(real)
    hls = (f"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n"
           f"#EXTINF:4.0,\n{target_abs}\n#EXT-X-ENDLIST\n").encode()
    hls_file = f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:4.0,\nfile://{target_abs}\n#EXT-X-ENDLIST\n".encode()
    hls_passwd = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\n/etc/passwd\n#EXT-X-ENDLIST\n"
    hls_net = b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:1.0,\nhttp://127.0.0.1:9/x.ts\n#EXT-X-ENDLIST\n"
    hls_master = (f"#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1000\n{target_abs}\n").encode()
    for ext in ("mp4", "mov", "mkv", "m3u8x"):
        e = ext if ext != "m3u8x" else "m3u8"
        c.add("videos", "vplaylist", "hls", f"abs_{ext}", e, hls)
        c.add("videos", "vplaylist", "hls", f"fileurl_{ext}", e, hls_file)
        c.add("videos", "vplaylist", "hls", f"passwd_{ext}", e, hls_passwd)
        c.add("videos", "vplaylist", "hls", f"net_{ext}", e, hls_net)
        c.add("videos", "vplaylist", "hls", f"master_{ext}", e, hls_master)
    # a playlist pointing at itself (its own future path) and at its sibling
    self_rel = "vplaylist__hls__self.mp4"
    c.add("videos", "vplaylist", "hls", "self", "mp4",
          f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{self_rel}\n#EXTINF:1.0,\n{self_rel}\n".encode())
    cc = f"ffconcat version 1.0\nfile '{target_abs}'\n".encode()
    cc_rel = b"ffconcat version 1.0\nfile 'vplaylist__hls__abs_mp4.mp4'\n"
    cc_self = b"ffconcat version 1.0\nfile 'vplaylist__ffconcat__self.mov'\nfile 'vplaylist__ffconcat__self.mov'\n"
    cc_passwd = b"ffconcat version 1.0\nfile '/etc/passwd'\n"
    cc_many = b"ffconcat version 1.0\n" + b"file 'vplaylist__ffconcat__abs_mp4.mp4'\n" * 2000
    for ext in ("mp4", "mov"):
        c.add("videos", "vplaylist", "ffconcat", f"abs_{ext}", ext, cc)
        c.add("videos", "vplaylist", "ffconcat", f"rel_{ext}", ext, cc_rel)
        c.add("videos", "vplaylist", "ffconcat", f"passwd_{ext}", ext, cc_passwd)
        c.add("videos", "vplaylist", "ffconcat", f"many_{ext}", ext, cc_many)
    c.add("videos", "vplaylist", "ffconcat", "self", "mov", cc_self)
    # other text-ish demuxers FFmpeg probes by content
    c.add("videos", "vplaylist", "sdp", "rtp", "mp4", b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nt=0 0\nm=video 9 RTP/AVP 96\na=rtpmap:96 H264/90000\n")
    c.add("videos", "vplaylist", "srt", "subs", "mp4", b"1\n00:00:00,000 --> 00:00:01,000\nhello\n\n")
    c.add("videos", "vplaylist", "image2", "jpeg_as_mp4", "mp4", (PHOTOS / "rocket.jpg").read_bytes())
    c.add("videos", "vplaylist", "tty", "ansi", "mp4", b"\x1b[31mred\x1b[0m\n" * 100)
    # the same playlists in the images tree (the image decoder must not follow them)
    c.add("images", "swap", "hls", "abs_as_jpg", "jpg", hls)
    c.add("images", "swap", "ffconcat", "abs_as_png", "png", cc)


def vswaps(c: Corpus) -> None:
    """Images in the videos tree, videos under other video extensions."""
    for p in sorted(PHOTOS.iterdir()):
        if p.suffix in (".png", ".jpg") and p.stat().st_size < 300_000:
            for e in ("mp4", "mkv", "webm"):
                c.add("videos", "vswap", p.stem, f"{p.suffix[1:]}_as_{e}", e, p.read_bytes())
    c.add("videos", "vswap", "animated", "gif_as_mp4", "mp4", (ODD / "animated.gif").read_bytes())
    for p in sorted(VIDEOS.iterdir()):
        if p.suffix in (".mp4", ".mkv", ".avi") and p.stat().st_size < 100_000:
            for e in ("mkv", "webm", "avi", "mp4", "jpg"):
                if e != p.suffix[1:]:
                    c.add("videos", "vswap", p.stem, f"{p.suffix[1:]}_as_{e}", e, p.read_bytes())


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="corpus folder (emptied first)")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiplies the seeded counts per base (truncations, flips, ranges)")
    args = ap.parse_args()
    t0 = time.monotonic()
    if args.out.exists():
        for sub in ("images", "videos", "dataset"):
            shutil.rmtree(args.out / sub, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    c = Corpus(args.out, args.seed, args.scale)
    gen_images(c)
    with tempfile.TemporaryDirectory() as tmp:
        gen_videos(c, Path(tmp))
    by_family: dict[str, int] = {}
    by_tree: dict[str, int] = {}
    for v in c.files.values():
        key = f"{v['tree']}/{v['family']}"
        by_family[key] = by_family.get(key, 0) + 1
        by_tree[v["tree"]] = by_tree.get(v["tree"], 0) + 1
    seconds = time.monotonic() - t0
    meta = {"seed": args.seed, "scale": args.scale, "files_total": len(c.files),
            "by_tree": by_tree, "by_family": dict(sorted(by_family.items())),
            "generation_seconds": round(seconds, 2),
            "pillow": Image.__version__, "files": dict(sorted(c.files.items()))}
    (args.out / "corpus.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{len(c.files)} files ({by_tree.get('images', 0)} images, {by_tree.get('videos', 0)} "
          f"videos) in {args.out} in {seconds:.1f} s")
    for k, v in sorted(by_family.items()):
        print(f"  {k:24} {v:6}")


if __name__ == "__main__":
    main()
