#!/usr/bin/env python3
"""Regenerate tests/fixtures/odd/ and tests/fixtures/bad/ from tests/fixtures/images/.

    python3 tools/make_fixtures.py            # writes both folders, then self-checks them
    python3 tools/make_fixtures.py --check    # only re-run the self-checks

Deterministic: every random byte comes from numpy.random.default_rng(fixed seed), every
resize is LANCZOS with fixed sizes, and no timestamps are written. Byte-for-byte output
depends on the encoder library versions (Pillow 13.0.0 / libjpeg-turbo / zlib / libwebp);
with the same versions two runs give identical bytes (the script prints a sha256 per file).

Needs: Pillow (with WebP), numpy. Stays single-threaded and light on CPU; the only
noticeable work is streaming ~200 MB of zero rows through zlib for bad/bomb.png (~1 s).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / "tests" / "fixtures" / "images"
ODD = ROOT / "tests" / "fixtures" / "odd"
BAD = ROOT / "tests" / "fixtures" / "bad"

SQ256_PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                "hubble_deep_field.jpg", "retina.jpg"]


# ----------------------------------------------------------------------------- helpers
def load(name: str) -> Image.Image:
    """Open a bundled photo and return a metadata-free copy (no icc/exif/comment in info)."""
    with Image.open(IMAGES / name) as im:
        im.load()
        return Image.frombytes(im.mode, im.size, im.tobytes())


def fresh(im: Image.Image) -> Image.Image:
    """Copy pixels into a brand-new image so no `info` (comment, exif, icc...) leaks into a save."""
    if im.mode == "P":
        out = Image.frombytes("P", im.size, im.tobytes())
        out.putpalette(im.getpalette())
        return out
    return Image.frombytes(im.mode, im.size, im.tobytes())


def shrink(im: Image.Image, long_side: int) -> Image.Image:
    """Downscale so the long side is `long_side` (LANCZOS); never upscales."""
    w, h = im.size
    s = long_side / max(w, h)
    if s >= 1:
        return im.copy()
    return im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)


def short_to(im: Image.Image, short_side: int) -> Image.Image:
    """Downscale so the short side is `short_side` (LANCZOS)."""
    w, h = im.size
    s = short_side / min(w, h)
    return im.resize((max(short_side, round(w * s)), max(short_side, round(h * s))), Image.LANCZOS)


def center_crop(im: Image.Image, cw: int, ch: int) -> Image.Image:
    w, h = im.size
    left, top = (w - cw) // 2, (h - ch) // 2
    return im.crop((left, top, left + cw, top + ch))


def save(im: Image.Image, path: Path, fmt: str, **kw) -> None:
    buf = io.BytesIO()
    fresh(im).save(buf, format=fmt, **kw)
    path.write_bytes(buf.getvalue())


def png_chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


PNG_SIG = b"\x89PNG\r\n\x1a\n"


def write_png_rgb16(arr: np.ndarray, path: Path) -> None:
    """Minimal PNG writer for 16-bit RGB (colour type 2, bit depth 16): Pillow cannot write this."""
    assert arr.dtype == np.uint16 and arr.ndim == 3 and arr.shape[2] == 3
    h, w, _ = arr.shape
    be = arr.astype(">u2")
    raw = b"".join(b"\x00" + be[y].tobytes() for y in range(h))  # filter type 0 on every row
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(PNG_SIG + png_chunk(b"IHDR", ihdr)
                     + png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b""))


def parse_png(data: bytes):
    """Tiny PNG parser for the self-checks: returns (ihdr tuple, list of (type, data), crc_ok)."""
    assert data[:8] == PNG_SIG, "bad signature"
    pos, chunks, crc_ok = 8, [], True
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        ctype, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        crc_ok &= crc == zlib.crc32(ctype + body)
        chunks.append((ctype, body))
        pos += 12 + n
    ihdr = struct.unpack(">IIBBBBB", chunks[0][1])
    return ihdr, chunks, crc_ok


def jpeg_segments(data: bytes):
    """Yield (marker, offset_of_marker, segment_length) for header segments up to and incl. SOS."""
    assert data[:2] == b"\xff\xd8"
    pos = 2
    while pos < len(data):
        assert data[pos] == 0xFF, f"expected marker at {pos}"
        marker = data[pos + 1]
        (n,) = struct.unpack(">H", data[pos + 2:pos + 4])
        yield marker, pos, n
        if marker == 0xDA:
            return
        pos += 2 + n


# ----------------------------------------------------------------------------- odd/
def make_odd() -> None:
    ODD.mkdir(parents=True, exist_ok=True)

    # 256x256 RGB centre crops (short side first brought to 256 so the crop shows the whole
    # subject); used with `pillow_ref.py --preprocess none` for byte-identity tests.
    for name in SQ256_PHOTOS:
        im = load(name).convert("RGB")
        sq = center_crop(short_to(im, 256), 256, 256)
        assert sq.size == (256, 256)
        stem = Path(name).stem
        save(sq, ODD / f"sq256_{stem}.png", "PNG", optimize=True)

    chelsea = shrink(load("chelsea.png").convert("RGB"), 160)      # 160x106
    coffee = shrink(load("coffee.png").convert("RGB"), 160)        # 160x107
    astronaut = shrink(load("astronaut.png").convert("RGB"), 128)  # 128x128
    rocket = shrink(load("rocket.jpg").convert("RGB"), 160)        # 160x107
    camera = shrink(load("camera.png"), 128)                       # L 128x128

    # CMYK JPEG (Pillow writes an Adobe APP14 marker, transform 0 = no colour transform).
    save(coffee.convert("CMYK"), ODD / "cmyk.jpg", "JPEG", quality=90)

    # 16-bit grayscale (mode I;16): luminance at 16-bit precision from the RGB photo.
    rgb = np.asarray(chelsea, dtype=np.float64)
    lum16 = np.clip(np.rint((rgb @ [0.299, 0.587, 0.114]) * 257.0), 0, 65535).astype(np.uint16)
    g16 = Image.fromarray(lum16)
    g16 = g16 if g16.mode == "I;16" else g16.convert("I;16")
    save(g16, ODD / "gray16.png", "PNG")

    # 16-bit RGB: high byte = the 8-bit photo, low byte = fixed-seed noise, so a decoder that
    # keeps the high byte (Pillow does) gives back the 8-bit photo exactly and one that keeps
    # the low byte gives noise.
    rgb8 = np.asarray(shrink(rocket, 96), dtype=np.uint16)  # 96x64
    low = np.random.default_rng(16).integers(0, 256, size=rgb8.shape, dtype=np.uint16)
    write_png_rgb16((rgb8 << 8) | low, ODD / "rgb16.png")

    # Palette PNG with tRNS: 63 colours from the photo + index 63 = (0,255,0) fully transparent
    # on a 16-px frame around the image.
    pal = astronaut.quantize(colors=63, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    p = np.asarray(pal).copy()
    p[:16, :] = 63
    p[-16:, :] = 63
    p[:, :16] = 63
    p[:, -16:] = 63
    palette = pal.getpalette()[: 63 * 3] + [0, 255, 0]
    pim = Image.frombytes("P", pal.size, p.astype(np.uint8).tobytes())
    pim.putpalette(palette)
    pim.save(ODD / "palette_trns.png", format="PNG", transparency=63, optimize=False)

    # RGBA: alpha is a left-to-right ramp 0..255, RGB untouched under alpha 0.
    w, h = chelsea.size
    ramp = np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))
    rgba = chelsea.copy()
    rgba.putalpha(Image.frombytes("L", (w, h), ramp.tobytes()))
    save(rgba, ODD / "rgba.png", "PNG")

    # LA: grayscale photo with a top-to-bottom alpha ramp.
    cw, ch = camera.size
    vramp = np.tile(np.linspace(255, 0, ch).round().astype(np.uint8)[:, None], (1, cw))
    la = camera.convert("LA")
    la.putalpha(Image.frombytes("L", (cw, ch), vramp.tobytes()))
    save(la, ODD / "la.png", "PNG")

    save(camera, ODD / "gray.jpg", "JPEG", quality=85)
    save(coffee, ODD / "progressive.jpg", "JPEG", quality=85, progressive=True)
    save(chelsea, ODD / "yuv444.jpg", "JPEG", quality=85, subsampling="4:4:4")

    # EXIF orientation 6 ("rotate 90 deg clockwise to display"): store the photo rotated 90 deg
    # counter-clockwise, so exif_transpose (which applies ROTATE_270 for 6) gives it back upright.
    upright = rocket  # 160x107 landscape: the stored JPEG is 107x160 (odd, not a multiple of 8)
    save(upright, ODD / "exif_upright.png", "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6
    save(upright.transpose(Image.Transpose.ROTATE_90), ODD / "exif_orient6.jpg", "JPEG",
         quality=95, exif=exif.tobytes())

    save(coffee, ODD / "comment.jpg", "JPEG", quality=85,
         comment=b"codeclm fixture: this COM marker must not reach the output")

    # Animated GIF: three different photos, same size, 3 frames.
    frames = [center_crop(short_to(load(n).convert("RGB"), 90), 120, 90)
              for n in ("chelsea.png", "coffee.png", "rocket.jpg")]
    frames = [fresh(f) for f in frames]
    frames[0].save(ODD / "animated.gif", format="GIF", save_all=True,
                   append_images=frames[1:], duration=200, loop=0)

    save(chelsea, ODD / "lossy.webp", "WEBP", quality=80, method=4)
    save(shrink(chelsea, 128), ODD / "lossless.webp", "WEBP", lossless=True, quality=100, method=4)
    save(shrink(coffee, 96), ODD / "photo.bmp", "BMP")
    save(shrink(chelsea, 96), ODD / "photo.tif", "TIFF")  # uncompressed RGB, 8 bit/sample

    px = load("astronaut.png").convert("RGB").getpixel((256, 128))
    Image.new("RGB", (1, 1), px).save(ODD / "one_pixel.png", format="PNG")

    hub = load("hubble_deep_field.jpg").convert("RGB")  # 1000x872: cut a 1000x40 strip
    save(hub.crop((0, 416, 1000, 456)), ODD / "wide.jpg", "JPEG", quality=90)

    retina = load("retina.jpg").convert("RGB")  # 1411x1411, CC0
    save(retina, ODD / "large.jpg", "JPEG", quality=85)


# ----------------------------------------------------------------------------- bad/
def make_bad() -> None:
    BAD.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240815)

    base_im = shrink(load("rocket.jpg").convert("RGB"), 128)  # 128x85
    buf = io.BytesIO()
    fresh(base_im).save(buf, format="JPEG", quality=75)
    base_jpg = buf.getvalue()
    buf = io.BytesIO()
    fresh(shrink(load("camera.png"), 96)).save(buf, format="PNG")
    base_png = buf.getvalue()

    (BAD / "empty.jpg").write_bytes(b"")
    (BAD / "truncated.jpg").write_bytes(base_jpg[: int(len(base_jpg) * 0.4)])
    (BAD / "truncated.png").write_bytes(base_png[: int(len(base_png) * 0.4)])

    garbage = rng.integers(0, 256, size=2048, dtype=np.uint8).tobytes()
    (BAD / "corrupt_header.jpg").write_bytes(b"\xff\xd8" + garbage.replace(b"\xff", b"\x00"))

    # Valid headers; every byte between the SOS header and EOI replaced by random non-0xFF
    # bytes (so no spurious markers appear: the damage is purely in the entropy-coded data).
    sos = [s for s in jpeg_segments(base_jpg) if s[0] == 0xDA][0]
    start = sos[1] + 2 + sos[2]
    end = len(base_jpg) - 2
    assert base_jpg[end:] == b"\xff\xd9"
    scan = rng.integers(0, 255, size=end - start, dtype=np.uint8).tobytes()  # 0..254
    (BAD / "corrupt_scan.jpg").write_bytes(base_jpg[:start] + scan + base_jpg[end:])

    (BAD / "not_an_image.jpg").write_bytes(
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
        b"<body><h1>Not Found</h1><p>The requested URL /photos/cat.jpg was not found on this "
        b"server.</p></body></html>\n")

    write_bomb(BAD / "bomb.png", 40000, 40000)

    sof = [s for s in jpeg_segments(base_jpg) if s[0] == 0xC0][0]
    hj = bytearray(base_jpg)
    struct.pack_into(">HH", hj, sof[1] + 5, 65000, 65000)  # FFC0 len(2) P(1) then Y(2) X(2)
    (BAD / "huge_dims.jpg").write_bytes(bytes(hj))

    tiny = shrink(load("chelsea.png").convert("RGB"), 48)  # 48x32
    save(tiny, BAD / "unsupported.ppm", "PPM")
    save(tiny, BAD / "unsupported.tga", "TGA")

    (BAD / "random.bin").write_bytes(np.random.default_rng(4096).integers(
        0, 256, size=4096, dtype=np.uint8).tobytes())

    buf = io.BytesIO()
    fresh(shrink(load("coffee.png").convert("RGB"), 16)).save(buf, format="PNG")
    zp = bytearray(buf.getvalue())
    assert zp[12:16] == b"IHDR"
    struct.pack_into(">I", zp, 16, 0)  # width = 0
    struct.pack_into(">I", zp, 29, zlib.crc32(bytes(zp[12:29])))
    (BAD / "zero_dims.png").write_bytes(bytes(zp))


def write_bomb(path: Path, w: int, h: int) -> None:
    """A fully valid PNG of w x h pixels, 1-bit grayscale, all black, streamed row by row.

    The image is never allocated: one row (filter byte + w/8 zero bytes) is fed to zlib h times.
    Deflate cannot beat ~1032:1, so 40000x40000 needs >= 200 MB of raw rows -> ~195 KB file even
    at 1 bit per pixel (an 8-bit file would be ~1.5 MB); "a few KB" is not reachable for a
    *valid* PNG of that size.
    """
    row = b"\x00" + bytes((w + 7) // 8)
    comp = zlib.compressobj(9, zlib.DEFLATED, 15, 9)
    parts = []
    for _ in range(h):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    idat = b"".join(parts)
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    # Split IDAT in 64 KiB chunks, like ordinary encoders.
    idats = b"".join(png_chunk(b"IDAT", idat[i:i + 65536]) for i in range(0, len(idat), 65536))
    path.write_bytes(PNG_SIG + png_chunk(b"IHDR", ihdr) + idats + png_chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- checks
def check() -> None:
    def op(name):
        return Image.open(ODD / name)

    for n in SQ256_PHOTOS:
        im = op(f"sq256_{Path(n).stem}.png")
        assert (im.size, im.mode) == ((256, 256), "RGB"), (n, im.size, im.mode)

    im = op("cmyk.jpg")
    assert im.mode == "CMYK", im.mode
    assert op("gray16.png").mode == "I;16", op("gray16.png").mode

    # rgb16.png: parse it ourselves and compare with what Pillow makes of it (high bytes).
    data = (ODD / "rgb16.png").read_bytes()
    (w, h, depth, ctype, _, _, _), chunks, crc_ok = parse_png(data)
    assert crc_ok and (depth, ctype) == (16, 2), (depth, ctype)
    raw = zlib.decompress(b"".join(b for t, b in chunks if t == b"IDAT"))
    stride = 1 + w * 6
    assert len(raw) == h * stride
    arr = np.frombuffer(b"".join(raw[y * stride + 1:(y + 1) * stride] for y in range(h)),
                        dtype=">u2").reshape(h, w, 3)
    assert all(raw[y * stride] == 0 for y in range(h))
    pil = np.asarray(Image.open(ODD / "rgb16.png").convert("RGB"))
    assert np.array_equal(pil, (arr >> 8).astype(np.uint8)), "Pillow != high byte"
    assert np.asarray(arr & 0xFF).std() > 50, "low byte should be noise"

    im = op("palette_trns.png")
    assert im.mode == "P" and im.info.get("transparency") == 63, im.info
    assert op("rgba.png").mode == "RGBA" and op("la.png").mode == "LA"
    assert op("gray.jpg").mode == "L"
    assert op("progressive.jpg").info.get("progressive") == 1
    assert Image.open(ODD / "yuv444.jpg").layer[0][1:3] == (1, 1)

    o6 = op("exif_orient6.jpg")
    upsz = op("exif_upright.png").size
    assert o6.getexif().get(0x0112) == 6 and o6.size == upsz[::-1] and upsz[0] > upsz[1], o6.size
    up = np.asarray(ImageOps.exif_transpose(o6).convert("RGB"), dtype=np.int16)
    ref = np.asarray(op("exif_upright.png").convert("RGB"), dtype=np.int16)
    assert up.shape == ref.shape and np.abs(up - ref).mean() < 3, np.abs(up - ref).mean()

    assert op("comment.jpg").info.get("comment", b"").startswith(b"codeclm fixture")
    g = op("animated.gif")
    assert getattr(g, "n_frames", 1) == 3 and g.is_animated
    assert op("lossless.webp").format == "WEBP" and op("lossy.webp").format == "WEBP"
    assert op("photo.bmp").mode == "RGB" and op("photo.tif").mode == "RGB"
    assert op("one_pixel.png").size == (1, 1)
    assert op("wide.jpg").size == (1000, 40)
    assert min(op("large.jpg").size) >= 1024

    # bad/
    assert (BAD / "empty.jpg").stat().st_size == 0
    (bw, bh, bd, bc, *_), chunks, crc_ok = parse_png((BAD / "bomb.png").read_bytes())
    assert crc_ok and (bw, bh, bd, bc) == (40000, 40000, 1, 0)
    d = zlib.decompressobj()
    total = 0
    for t, b in chunks:
        if t == b"IDAT":
            while b:
                out = d.decompress(b, 1 << 20)
                total += len(out)
                b = d.unconsumed_tail
    assert d.eof and total == 40000 * (1 + 5000), total
    (zw, zh, *_), _, crc_ok = parse_png((BAD / "zero_dims.png").read_bytes())
    assert zw == 0 and zh > 0 and crc_ok
    hd = (BAD / "huge_dims.jpg").read_bytes()
    sof = [s for s in jpeg_segments(hd) if s[0] == 0xC0][0]
    assert struct.unpack(">HH", hd[sof[1] + 5:sof[1] + 9]) == (65000, 65000)
    cs = (BAD / "corrupt_scan.jpg").read_bytes()
    assert [s[0] for s in jpeg_segments(cs)][-1] == 0xDA and cs.endswith(b"\xff\xd9")

    # How Pillow itself reacts to each bad file (informational; LOAD_TRUNCATED_IMAGES off).
    for f in sorted(BAD.iterdir()):
        if f.suffix == ".md":
            continue
        try:
            with Image.open(f) as im:
                im.load()
                res = f"decoded {im.format} {im.mode} {im.size}"
        except Exception as e:  # noqa: BLE001
            res = f"{type(e).__name__}: {str(e)[:70]}"
        print(f"  pillow on bad/{f.name}: {res}")


def report() -> None:
    for folder in (ODD, BAD):
        total = 0
        for f in sorted(folder.iterdir()):
            if f.suffix == ".md":
                continue
            b = f.read_bytes()
            total += len(b)
            print(f"{f.relative_to(ROOT)}  {len(b):>8}  {hashlib.sha256(b).hexdigest()[:16]}")
        print(f"{folder.relative_to(ROOT)}: {total} bytes total")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only verify existing fixtures")
    a = ap.parse_args()
    if not a.check:
        make_odd()
        make_bad()
    check()
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
