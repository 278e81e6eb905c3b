"""64-bit perceptual hash (DCT pHash) in numpy, for copy detection.

The algorithm is the classic one (and the one ``imagehash.phash`` implements): grey levels,
resize to 32x32 with Lanczos, 2-D DCT-II, keep the 8x8 lowest frequencies (DC included),
one bit per coefficient: 1 when it is above the median of those 64. Bits are read row by row,
the first as the most significant, so ``phash(im) == int(str(imagehash.phash(im)), 16)``.

Near-identical pictures (re-encoded, resized, slightly brightened) differ in a few bits;
unrelated pictures in about half of them. The hash is an unsigned 64-bit value; SQL BIGINT
columns are signed, so store :func:`to_signed64` and read back with :func:`from_signed64`.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

__all__ = ["HASH_BITS", "from_signed64", "hamming", "phash", "to_signed64"]

HASH_BITS = 64
_SIZE = 32  # side of the image the DCT runs on
_KEEP = 8  # low-frequency block kept: 8x8 = 64 bits
_MASK = (1 << HASH_BITS) - 1


@functools.lru_cache(maxsize=1)
def _dct_rows() -> np.ndarray:
    """The first 8 rows of the (unnormalised) DCT-II matrix for 32 samples: [8, 32].

    The usual factor 2 (and any normalisation) is left out: it scales every coefficient alike
    and cannot change which side of the median a coefficient falls on.
    """
    k = np.arange(_KEEP)[:, None]
    n = np.arange(_SIZE)[None, :]
    matrix = np.cos(np.pi * k * (2 * n + 1) / (2 * _SIZE))
    matrix.setflags(write=False)
    return matrix


def phash(image: Image.Image) -> int:
    """The 64-bit DCT perceptual hash of ``image`` as an unsigned Python int."""
    grey = image.convert("L").resize((_SIZE, _SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    c = _dct_rows()
    low = c @ pixels @ c.T  # DCT along rows (axis 0), then columns; [8, 8]
    bits = (low > np.median(low)).ravel()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two 64-bit hashes (signed or unsigned form)."""
    return ((a ^ b) & _MASK).bit_count()


def to_signed64(value: int) -> int:
    """Unsigned 64-bit hash -> the signed int64 with the same bits (for a BIGINT column)."""
    if not 0 <= value <= _MASK:
        raise ValueError(f"expected an unsigned 64-bit value, got {value}")
    return value - (1 << HASH_BITS) if value >= 1 << (HASH_BITS - 1) else value


def from_signed64(value: int) -> int:
    """Signed int64 (as stored in SQL) -> the unsigned 64-bit hash."""
    if not -(1 << (HASH_BITS - 1)) <= value < 1 << (HASH_BITS - 1):
        raise ValueError(f"expected a signed 64-bit value, got {value}")
    return value & _MASK
