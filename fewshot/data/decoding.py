"""Decoding a split's stored images (files, encoded bytes, arrays) into a chunked cache: in
worker processes, a block at a time so memory stays bounded, logging progress."""

from __future__ import annotations

import io
import logging
import multiprocessing
import re
import struct
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from PIL import Image, UnidentifiedImageError

from fewshot.data.files import ChunkedCache

log = logging.getLogger(__name__)

T = TypeVar("T")
BLOCK = 2048  # images decoded, then written, together: ~43 MB at 84 px
PROGRESS_EVERY_S = 10.0
# What PIL raises on a file that is not a readable image: OSError (an unknown format, truncated
# data), what its format parsers let through (ValueError, TypeError, SyntaxError, EOFError,
# struct.error), and DecompressionBombError, which is a plain Exception, for a header claiming
# more pixels than Image.MAX_IMAGE_PIXELS allows: a damaged file is not a crash.
IMAGE_ERRORS = (
    OSError,
    ValueError,
    TypeError,
    SyntaxError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)
_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def image_error(err: BaseException) -> str:
    """Why PIL could not read an image, in one line for a message that names the file itself:
    PIL names an in-memory file by its repr (`<_io.BytesIO object at 0x...>`), which says
    nothing to the user."""
    if isinstance(err, Image.DecompressionBombError):
        claimed = _BOMB.search(str(err))
        pixels = f"{int(claimed[1]):,} pixels" if claimed else "more pixels than PIL decodes"
        limit = f" (PIL's limit: {int(claimed[2]):,})" if claimed else ""
        return (
            f"its header claims {pixels}{limit}, so it was not decoded: the file is damaged "
            "or built to exhaust memory; replace it"
        )
    if isinstance(err, UnidentifiedImageError):
        return "not an image file PIL can read (unknown format, or damaged)"
    text = " ".join(_OBJECT_REPR.sub("the image", str(err)).split())
    return text or type(err).__name__


def rgb_bytes(image: Image.Image, image_size: int) -> bytes:
    """An image's pixels as uint8 [S, S, 3] bytes, resized (Lanczos) only if it is not S x S."""
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.LANCZOS)
    return image.tobytes()


def rgb_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """An image's pixels as uint8 [3, S, S], resized as `rgb_bytes` resizes them."""
    pixels = torch.frombuffer(bytearray(rgb_bytes(image, image_size)), dtype=torch.uint8)
    return pixels.view(image_size, image_size, 3).permute(2, 0, 1)


def rgb_image(data: bytes, image_size: int) -> torch.Tensor:
    """An image file's bytes -> uint8 [3, S, S], as the RGB datasets read theirs (a loader's
    `decode_image`, see fewshot.data.registry). Raises what PIL raises (IMAGE_ERRORS): the
    caller names the file."""
    with Image.open(io.BytesIO(data)) as image:
        return rgb_tensor(image, image_size)


def per_class_count(classes: dict[str, Sequence[T]], what: str) -> int:
    """The images every class of a split keeps: the fewest any class has (logged if unequal)."""
    counts = {name: len(items) for name, items in classes.items()}
    per_class = min(counts.values())
    if max(counts.values()) > per_class:
        # One tensor per split needs one count; the extra images of larger classes go.
        smallest = min(counts, key=counts.get)
        log.warning(
            "%s classes hold %d to %d images (fewest: %s); each keeps its first %d",
            what,
            per_class,
            max(counts.values()),
            smallest,
            per_class,
        )
    return per_class


def write_split(
    cache: ChunkedCache,
    key: str,
    classes: dict[str, Sequence[T]],
    decode: Callable[[T], bytes],
    image_size: int,
    workers: int,
    what: str,
) -> None:
    """Cache entry `key`: uint8 [classes, per_class, 3, S, S], the first `per_class` images of
    every class, each turned into [S, S, 3] bytes by `decode` (in `workers` processes if > 0;
    `decode` must then be picklable, e.g. a functools.partial of a module-level function)."""
    per_class = per_class_count(classes, what)
    items = [item for group in classes.values() for item in group[:per_class]]
    cache.begin(key, (len(classes), per_class, 3, image_size, image_size))
    log.info("decoding %d images of %d %s classes", len(items), len(classes), what)
    started = last_log = time.perf_counter()
    # Items travel to the workers by pipe under any start method; blocks bound what is in flight.
    pool = multiprocessing.get_context().Pool(workers) if workers > 0 else None
    try:
        for start in range(0, len(items), BLOCK):
            block = items[start : start + BLOCK]
            decoded = pool.map(decode, block, chunksize=64) if pool else list(map(decode, block))
            pixels = torch.frombuffer(bytearray(b"".join(decoded)), dtype=torch.uint8)
            cache.append(pixels.view(len(block), image_size, image_size, 3).permute(0, 3, 1, 2))
            done, now = start + len(block), time.perf_counter()
            if now - last_log >= PROGRESS_EVERY_S and done < len(items):
                rate = done / (now - started)
                log.info(
                    "%s: %d/%d images (%.0f%%), %.0f images/s, about %.0f s left",
                    what,
                    done,
                    len(items),
                    100 * done / len(items),
                    rate,
                    (len(items) - done) / rate,
                )
                last_log = now
    finally:
        if pool is not None:
            pool.terminate()
    log.info("decoded %s in %.0f s", what, time.perf_counter() - started)
