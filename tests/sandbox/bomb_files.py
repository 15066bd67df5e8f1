"""Hostile image files, built byte by byte: each costs a naive header read seconds or hundreds of MB.

Measured reading each with ``PIL.Image.open`` in-process on the 2-core development machine: the PNG of 2 million
empty chunks took 17 s and 216 MB, the TIFF of 3 million strips 24 s and 977 MB; the ICO decodes the 13000x13000
PNG it wraps (676 MB).
"""

from __future__ import annotations

import struct
import zlib

MANY = 2_000_000


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_start(width: int, height: int, color_type: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))


def png_of_empty_chunks(count: int = MANY) -> bytes:
    """A 1x1 PNG with ``count`` empty private chunks before its pixels: PIL keeps every one in a list."""
    return (_png_start(1, 1, 0) + _png_chunk(b"prVt", b"") * count + _png_chunk(b"IDAT", zlib.compress(b"\0\0"))
            + _png_chunk(b"IEND", b""))  # fmt: skip


def ico_wrapping_huge_png(side: int = 13000) -> bytes:
    """An ICO whose one entry is a ``side`` x ``side`` RGBA PNG: opening the ICO decodes it (4 bytes a pixel)."""
    png = _png_start(side, side, 6) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b"")
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def tiff_of_many_strips(count: int = 3_000_000) -> bytes:
    """A 1 x ``count`` grey TIFF with one strip per row: PIL reads both strip tables into Python tuples."""
    entries = [(256, 3, 1, 1), (257, 4, 1, count), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, count, "offsets"), (278, 4, 1, 1), (279, 4, count, "counts")]  # fmt: skip
    offsets_at = 8 + 2 + 12 * len(entries) + 4
    counts_at = offsets_at + 4 * count
    pixels_at = counts_at + 4 * count
    ifd = struct.pack("<H", len(entries))
    for tag, kind, number, value in entries:
        value = {"offsets": offsets_at, "counts": counts_at}.get(value, value)  # type: ignore[arg-type]
        ifd += (
            struct.pack("<HHII", tag, kind, number, value)
            if kind == 4
            else struct.pack("<HHIHH", tag, kind, number, value, 0)
        )
    header = b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)
    return header + struct.pack("<I", pixels_at) * count + struct.pack("<I", 1) * count + b"\0" * count


def gif_of_many_frames(count: int = 500_000) -> bytes:
    """A 1x1 GIF with ``count`` frames."""
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff" + frame * count + b"\x3b"


def gif_claiming_huge_screen() -> bytes:
    """A GIF whose screen and frame claim 65535x65535 pixels (4.3 billion), in 40 bytes."""
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff" + frame + b"\x3b"


def jpeg_claiming_huge_size() -> bytes:
    """A JPEG whose frame header claims 65500x65500 pixels."""
    frame = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 65500, 65500, 1) + b"\x01\x11\x00"
    scan = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00\x00\x3f\x00"
    return b"\xff\xd8" + frame + scan + b"\x00" * 16 + b"\xff\xd9"


BOMBS = {
    "chunks.png": (png_of_empty_chunks, "could not be read within"),
    "icon.png": (ico_wrapping_huge_png, "is not a readable image (not a PNG, JPEG, BMP, GIF, TIFF or WebP file)"),
    "strips.tif": (tiff_of_many_strips, "could not be read within"),
    "frames.gif": (gif_of_many_frames, "is an animation"),
    "screen.gif": (gif_claiming_huge_screen, "is 65535x65535, more pixels than the limit"),
    "huge.jpg": (jpeg_claiming_huge_size, "is 65500x65500, more pixels than the limit"),
}
"""File name -> (builder, what the error line must say)."""
