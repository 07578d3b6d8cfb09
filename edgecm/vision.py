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
        raise EdgecmError(f"{path}: no such image file; check the path")
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise EdgecmError(
            f"{path}: image is too large (over {MAX_IMAGE_PIXELS:,} pixels, possibly a decompression bomb); "
            f"downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise EdgecmError(f"{path}: not an image file; use a PNG, JPEG or WebP image") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise EdgecmError(f"{path}: image is corrupt or truncated ({exc}); re-export or re-download it") from None
