"""Reading image files safely; each family's own vision encoder lives in edgecm/families."""

from __future__ import annotations

import warnings
from pathlib import Path

from edgecm.errors import EdgecmError

# Larger images are refused instead of decoded: a decompression bomb (a tiny
# file that expands to gigapixels) must not take the process down.
MAX_IMAGE_PIXELS = 64_000_000


def load_image(path: str | Path):
    """Open an image file as RGB, or raise EdgecmError naming the file and the fix."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise EdgecmError(not_a_file(path, "image file"))
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise EdgecmError(
            f"{path}: image is too large (over {MAX_IMAGE_PIXELS:,} pixels, possibly a decompression bomb); "
            f"downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise EdgecmError(f"{path}: not an image file; use a PNG, JPEG or WebP image") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise EdgecmError(f"{path}: image is corrupt or truncated ({exc}); re-export or re-download it") from None


def not_a_file(path: Path, what: str) -> str:
    """Why ``path`` cannot be read as a ``what``, for a path that is not a regular file."""
    import stat

    if path.is_symlink() and not path.exists():
        return f"{path}: a symbolic link to nothing (its target is missing, or the link loops); fix or remove it"
    try:
        mode = path.stat().st_mode
    except OSError:
        return f"{path}: no such {what}; check the path"
    # Never opened: reading a FIFO would wait for a writer forever.
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device")
    return f"{path}: {kind}, not {'an' if what[0] in 'aeiou' else 'a'} {what}; pass a regular file"


# Pillow's integer modes for 16-bit greyscale (PNG, TIFF): values up to 65535 in "I;16*" or "I".
_WIDE_GREY_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


def _to_rgb(img):
    """RGB for any input mode; 16-bit greyscale is scaled to 8 bits instead of clipped.

    Pillow's own ``convert("RGB")`` clips 16-bit values above 255, so a normal
    16-bit greyscale photo comes out white; dividing by 257 maps 0..65535 onto
    0..255 exactly, the image the user sees.
    """
    import numpy as np
    from PIL import Image

    if img.mode in _WIDE_GREY_MODES:
        wide = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")
