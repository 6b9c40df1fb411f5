"""A small EER (Electron Event Representation) encoder for tests, written from the format's
description (EER file format documentation 3.0, section 4, as implemented by imagecodecs'
``imcd_eer_decode`` and RELION's ``EERRenderer``):

- an EER file is a BigTIFF with one page per raw frame; compression 65000 (8 skip bits, 2 + 2
  sub-pixel bits), 65001 (7 + 2 + 2) or 65002 (bit counts in tags 65007, 65008, 65009);
- a frame is a bit stream, read least significant bit first from little-endian bytes, of codes
  ``skip`` (``skipbits``) followed, unless ``skip`` is all ones, by the event's horizontal then
  vertical sub-pixel bits. ``skip`` all ones advances ``2**skipbits - 1`` pixels without an event;
  any other ``skip`` advances ``skip`` pixels (row-major on the physical grid), records an event
  there and moves one pixel on. The stream ends when the position reaches the pixel count;
- sub-pixel values are stored XOR ``0b10`` per 2-bit component (RELION: ``symbol ^ 0x0A``).

Events are ``(x, y, sx, sy)``: physical column and row, and the true sub-pixel position
``sx, sy`` in ``0 .. 2**bits - 1``; at most one event per physical pixel and frame.
"""

from __future__ import annotations

import struct

import numpy as np

SCHEMES = {65000: (8, 2, 2), 65001: (7, 2, 2)}
METADATA = (
    b'<metadata><item name="sensorImageHeight">{h}</item>'
    b'<item name="sensorImageWidth">{w}</item></metadata>'
)


def encode_frame(events, shape, skipbits=7, horzbits=2, vertbits=2) -> bytes:
    """EER bit stream of one frame of ``shape`` ``(H, W)`` (physical) holding ``events``."""
    h, w = shape
    skipmax = (1 << skipbits) - 1
    order = sorted(events, key=lambda e: (e[1], e[0]))
    bits, nbits = 0, 0

    def put(value, n):
        nonlocal bits, nbits
        bits |= (int(value) & ((1 << n) - 1)) << nbits
        nbits += n

    cur = 0
    for x, y, sx, sy in order:
        pos = int(y) * w + int(x)
        if pos < cur:
            raise ValueError("two events in one pixel of one frame")
        gap = pos - cur
        while gap >= skipmax:
            put(skipmax, skipbits)
            gap -= skipmax
        put(gap, skipbits)
        put(int(sx) ^ (1 << (horzbits - 1)), horzbits)
        put(int(sy) ^ (1 << (vertbits - 1)), vertbits)
        cur = pos + 1
    rest = h * w - cur
    while rest >= skipmax:
        put(skipmax, skipbits)
        rest -= skipmax
    put(rest, skipbits)  # reaches the pixel count: the decoder stops here
    put(0, horzbits + vertbits)
    nbytes = (nbits + 7) // 8
    nbytes += nbytes % 2  # whole 16-bit words
    return bits.to_bytes(nbytes, "little")


def write_eer(path, frames, shape, compression=65001, bits=None) -> None:
    """Write an EER file, a little-endian BigTIFF with one page (one strip) per raw frame:
    ``frames`` is a list of event lists (see :func:`encode_frame`), ``shape`` the physical
    ``(H, W)``; ``bits`` ``(skip, horz, vert)`` for compression 65002 (tags 65007-65009)."""
    skip, hb, vb = SCHEMES.get(compression) or bits
    meta = METADATA.replace(b"{h}", b"%d" % shape[0]).replace(b"{w}", b"%d" % shape[1])
    out = bytearray(b"II" + struct.pack("<HHHQ", 43, 8, 0, 0))
    link = 8  # where the offset of the next IFD goes
    for k, events in enumerate(frames):
        data = encode_frame(events, shape, skip, hb, vb)
        strip = len(out)
        out += data
        blob = len(out)
        if k == 0:
            out += meta + b"\0" * (len(meta) % 2)
        tags = [
            (256, 4, 1, shape[1]),  # ImageWidth
            (257, 4, 1, shape[0]),  # ImageLength
            (258, 3, 1, 1),  # BitsPerSample
            (259, 3, 1, compression),
            (262, 3, 1, 1),  # Photometric: min-is-black
            (273, 16, 1, strip),  # StripOffsets
            (277, 3, 1, 1),  # SamplesPerPixel
            (278, 4, 1, shape[0]),  # RowsPerStrip
            (279, 16, 1, len(data)),  # StripByteCounts
        ]
        if k == 0:
            tags.append((65001, 7, len(meta), blob))  # acquisition metadata (XML)
        if compression == 65002:
            tags += [(65007, 3, 1, skip), (65008, 3, 1, hb), (65009, 3, 1, vb)]
        ifd = len(out)
        struct.pack_into("<Q", out, link, ifd)
        out += struct.pack("<Q", len(tags))
        for tag, typ, count, value in tags:
            out += struct.pack("<HHQQ", tag, typ, count, value)
        link = len(out)
        out += struct.pack("<Q", 0)
    with open(path, "wb") as f:
        f.write(out)


def random_events(rng, shape, n, bits=2):
    """``n`` events at distinct random physical pixels of ``shape`` with random sub-pixels."""
    h, w = shape
    flat = rng.choice(h * w, size=n, replace=False)
    sub = rng.integers(0, 1 << bits, size=(n, 2))
    return [(int(p % w), int(p // w), int(a), int(b)) for p, (a, b) in zip(flat, sub, strict=True)]


def render(frames, shape, upsampling=1, bits=2):
    """Reference counts ``(H*up, W*up)`` int64 of all ``frames``: RELION's ``render4K_to_4K``
    (``y, x``) and ``render4K_to_8K`` (``2y + (sy >> (bits-1)), 2x + (sx >> (bits-1))``)."""
    out = np.zeros((shape[0] * upsampling, shape[1] * upsampling), np.int64)
    for events in frames:
        for x, y, sx, sy in events:
            if upsampling == 1:
                out[y, x] += 1
            else:
                out[2 * y + (sy >> (bits - 1)), 2 * x + (sx >> (bits - 1))] += 1
    return out
