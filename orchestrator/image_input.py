"""Input images of an edit (``image``, ``mask``): decoded, checked and resized before anything is queued, so a bad
file is a 400 naming its field and a replica only ever receives uint8 arrays of the request's exact size. The rules
(format, file and pixel limits, animation, colour modes, EXIF orientation, alpha, the mask, the output size) are the
same for HTTP, the Python API and the CLI: docs/conditioning.md, "Input images".

Memory: the images are decoded one at a time, each converted and resized to the output size before the next is
decoded, so a request holds at most one image at its stored size. No torch here: this runs in the HTTP process."""

from __future__ import annotations

import io
import math
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np

from zimage_common.config import LimitsConfig
from zimage_common.errors import InvalidRequestError

# PIL warns of a decompression bomb before the pixel limits here refuse the file with an error naming the field; the
# warning would print beside that error (one filter for the process: catch_warnings is not thread-safe).
warnings.filterwarnings("ignore", message="Image size .* could be decompression bomb DOS attack")

FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}
MODES_OK = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa"}
SIXTEEN_BIT = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
MULTIPLE = 16
MAX_IMAGES = 16  # OpenAI's limit on `image`


def _png_bit_depth(data: bytes) -> int | None:
    """The bit depth in a PNG's IHDR (Pillow reads a 16-bit RGB PNG as 8-bit RGB, so its mode does not tell)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 25 and data[12:16] == b"IHDR":
        return struct.unpack(">B", data[24:25])[0]
    return None


_BASE64_MARK = re.compile(r";\x20*base64$", re.IGNORECASE)
_ASCII_WHITESPACE = str.maketrans("", "", " \t\n\f\r")


def forgiving_base64(text: str) -> bytes:
    """Base64 text -> bytes, read as the Fetch standard reads a data: URL's ("forgiving-base64 decode"): ASCII
    whitespace ignored (base64 wrapped every 76 characters, as the base64 tool and ``base64.encodebytes`` write it),
    the padding optional, percent-escapes decoded. Anything else that is not base64 is a ValueError."""
    import base64
    import binascii
    from urllib.parse import unquote

    try:
        return base64.b64decode(text, validate=True)  # the usual case, in one pass
    except (binascii.Error, ValueError):
        pass
    if "%" in text:
        text = unquote(text, errors="strict")
    text = text.translate(_ASCII_WHITESPACE)
    if len(text) % 4 == 0 and text.endswith("="):
        text = text[:-2] if text.endswith("==") else text[:-1]
    if len(text) % 4 == 1:
        raise ValueError("not base64")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise ValueError("not base64") from None


def data_url_bytes(ref, param: str) -> bytes:
    """An ``ImageRefParam`` of a JSON edit (``{"image_url": ...}`` or ``{"file_id": ...}``) -> the image's bytes.
    Only ``data:`` URLs: this server fetches nothing from the network, and its Files API holds batch input only."""
    if not isinstance(ref, dict) or set(ref) - {"image_url", "file_id"} or len(ref) != 1:
        raise InvalidRequestError(f"{param} must be an object with exactly one of image_url or file_id",
                                  param=param)
    if "file_id" in ref:
        raise InvalidRequestError(f"{param}: file_id is not supported (this server's Files API holds batch input "
                                  f"only); send the image as a data: URL in image_url, or as multipart/form-data",
                                  param=param)
    url = ref["image_url"]
    if not isinstance(url, str):
        raise InvalidRequestError(f"{param}: image_url must be a string", param=param)
    if url[:5].lower() != "data:":
        raise InvalidRequestError(f"{param}: only data: URLs are accepted (this server fetches no URLs); send "
                                  f"'data:image/png;base64,...' or use multipart/form-data", param=param)
    head, sep, body = url.partition(",")
    if not sep or not _BASE64_MARK.search(head.strip()):
        raise InvalidRequestError(f"{param}: image_url must be a base64 data URL ('data:image/png;base64,...')",
                                  param=param)
    try:
        return forgiving_base64(body)
    except ValueError:
        raise InvalidRequestError(f"{param}: the data URL's base64 is invalid (characters other than A-Z a-z 0-9 + "
                                  f"/ and = padding, or a truncated last group)", param=param) from None


def prepare_control(data, width: int, height: int, limits: LimitsConfig) -> np.ndarray:
    """A ControlNet's control image: the image rules above (param ``control_image``), then resized to the
    output size (Lanczos, aspect ratio not kept, as diffusers' pipeline resizes it); uint8 ``[H, W, 3]``."""
    data = control_bytes(data)
    check_request_pixels([("control_image", data)], limits, "control_image")
    return _rgb_array(data, "control_image", limits, (width, height))[0]


def control_bytes(data):
    """A control image as given (bytes, a base64 string from JSON: a data URL or bare base64, a PIL image) -> what
    ``open_image`` takes."""
    if isinstance(data, str):  # JSON: a base64 data URL, or bare base64
        text = data.partition(",")[2] if data[:5].lower() == "data:" else data
        try:
            return forgiving_base64(text)
        except ValueError:
            raise InvalidRequestError("control_image must be a base64 image (a data: URL or bare base64)",
                                      param="control_image") from None
    return data


def file_bytes(obj, param: str):
    """What the Python API and the CLI accept as an image -> the file's bytes (bytes, a path) or a PIL image (a
    PIL image, or a uint8 array ``[H, W, 3]``, ``[H, W, 4]`` or ``[H, W]``; the last two keep their alpha /
    greyscale). ``open_image`` takes either."""
    from pathlib import Path

    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    if isinstance(obj, (str, Path)):
        try:
            return Path(obj).read_bytes()
        except OSError as e:
            raise InvalidRequestError(f"{param}: cannot read {str(obj)!r}: {e.strerror}", param=param) from None
    from PIL import Image

    if isinstance(obj, np.ndarray):
        if obj.dtype != np.uint8 or obj.ndim not in (2, 3) or (obj.ndim == 3 and obj.shape[2] not in (3, 4)):
            raise InvalidRequestError(f"{param} must be a uint8 array [H, W], [H, W, 3] or [H, W, 4], got "
                                      f"{obj.dtype} {list(obj.shape)}", param=param)
        obj = Image.fromarray(obj)
    if isinstance(obj, Image.Image):
        return obj
    raise InvalidRequestError(f"{param} must be image bytes, a path, a PIL image or a uint8 array, got "
                              f"{type(obj).__name__}", param=param)


def open_image(data, param: str, limits: LimitsConfig):
    """Decode one uploaded file into a PIL image, oriented per its EXIF tag; every refusal a 400 naming ``param``.
    ``data`` may also be a PIL image (the Python API): the same checks, less those of the file."""
    from PIL import Image

    if isinstance(data, Image.Image):
        return _check_decoded(data, b"", param, limits)
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    return _check_decoded(_open_header(data, param, limits), data, param, limits)


def _open_header(data, param: str, limits: LimitsConfig):
    """``Image.open`` of an uploaded file: its header read (format, mode, size), no pixel decoded yet; the file's
    own checks (empty, too many bytes, not an image, a format we do not take)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise InvalidRequestError(f"{param} must be an image file (PNG, JPEG or WebP)", param=param)
    if not data:
        raise InvalidRequestError(f"{param} is an empty file; send a PNG, JPEG or WebP image", param=param)
    if len(data) > limits.max_image_bytes:
        raise InvalidRequestError(f"{param} is {len(data)} bytes; the limit is {limits.max_image_bytes} "
                                  f"(limits.max_image_bytes)", param=param)
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InvalidRequestError(f"{param} is not an image this server can read; send a PNG, JPEG or WebP file",
                                  param=param) from None
    except Image.DecompressionBombError:
        raise InvalidRequestError(f"{param} is too large to decode", param=param) from None
    if img.format == "MPO":  # a multi-picture JPEG (phones: HDR gain map, depth, stereo): the photo is picture 1
        img.seek(0)
    elif img.format not in FORMATS:
        raise InvalidRequestError(f"{param} is a {img.format} image; send PNG, JPEG or WebP", param=param)
    return img


def _stored_size(data, param: str, limits: LimitsConfig) -> tuple[int, int]:
    """An input image's (width, height) as stored, from its header: nothing decoded."""
    from PIL import Image

    if isinstance(data, Image.Image):
        return data.size
    img = _open_header(data, param, limits)
    size = img.size
    img.close()
    return size


def _check_pixels(w: int, h: int, param: str, limits: LimitsConfig) -> int:
    if w * h > limits.max_input_pixels:
        raise InvalidRequestError(f"{param} is {w}x{h} ({w * h} pixels); the limit is {limits.max_input_pixels} "
                                  f"(limits.max_input_pixels)", param=param)
    return w * h


def stored_pixels(data, param: str, limits: LimitsConfig) -> int:
    """An input image's pixels as stored, checked against ``limits.max_input_pixels``."""
    return _check_pixels(*_stored_size(data, param, limits), param, limits)


def input_pixels(datas, limits: LimitsConfig) -> int:
    """The pixels as stored of those of ``datas`` (file bytes, base64 text, PIL images; None skipped) that are
    images, read from their headers: what decoding them will take. Anything unreadable counts 0 (its parse
    refuses it). For admission to the HTTP server's decode queue."""
    total = 0
    for data in datas:
        if data is None:
            continue
        try:
            w, h = _stored_size(control_bytes(data), "image", limits)
        except Exception:  # noqa: BLE001 - not an image: refused by the parse, not here
            continue
        total += w * h
    return total


def check_request_pixels(files: list[tuple[str, object]], limits: LimitsConfig, param: str = "image") -> None:
    """All of one request's input images ``[(param, data), ...]`` (None entries skipped) against
    ``limits.max_request_input_pixels``, from their headers before any is decoded: a 400 naming ``param``."""
    files = [(p, d) for p, d in files if d is not None]
    total = sum(stored_pixels(d, p, limits) for p, d in files)
    limit = limits.max_request_input_pixels
    if total > limit:
        raise InvalidRequestError(
            f"{param}: the {len(files)} input image(s) of this request have {total} pixels together; the limit is "
            f"{limit} (limits.max_request_input_pixels). Send fewer images, or downscale them before uploading: "
            f"every input is resized to the output size (at most {limits.max_pixels} pixels) anyway",
            param=param)


def _check_decoded(img, data: bytes, param: str, limits: LimitsConfig):
    from PIL import Image

    w, h = img.size
    _check_pixels(w, h, param, limits)
    if w < 1 or h < 1:
        raise InvalidRequestError(f"{param} has no pixels", param=param)
    if img.format != "MPO" and getattr(img, "is_animated", False) and getattr(img, "n_frames", 1) > 1:
        raise InvalidRequestError(f"{param} is animated ({img.n_frames} frames); send a still image", param=param)
    if img.mode in SIXTEEN_BIT or (_png_bit_depth(data) or 8) > 8:
        raise InvalidRequestError(f"{param} has 16 bits per channel (or floating-point pixels); send an 8-bit "
                                  f"image", param=param)
    if img.mode == "CMYK":
        raise InvalidRequestError(f"{param} is a CMYK image; convert it to RGB (sRGB) first", param=param)
    if img.mode not in MODES_OK:
        raise InvalidRequestError(f"{param} has colour mode {img.mode}; send an 8-bit RGB, RGBA or greyscale image",
                                  param=param)
    try:
        img.load()
    except Image.DecompressionBombError:
        raise InvalidRequestError(f"{param} is too large to decode", param=param) from None
    except (OSError, ValueError, SyntaxError, struct.error):
        raise InvalidRequestError(f"{param} is truncated or corrupt; send a complete PNG, JPEG or WebP file",
                                  param=param) from None
    return _upright(img)


_TURN = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
         7: "TRANSVERSE", 8: "ROTATE_90"}  # EXIF orientation -> the transpose that turns the pixels upright


def _upright(img):
    """The image turned as its EXIF orientation says (a new image; the caller's is left as it is), or the image
    itself. Not ``ImageOps.exif_transpose``: after turning the pixels it rewrites the EXIF block, and one malformed
    tag anywhere in that untrusted block (a RATIONAL tag holding text, found by fuzzing) raised from the rewrite
    (TypeError in Pillow 13): a server error for a picture that decodes. Only the orientation is read here, and
    metadata that cannot be read counts as no orientation."""
    from PIL import ExifTags, Image

    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - any failure to parse untrusted metadata means "no orientation"
        orientation = 1
    turn = _TURN.get(orientation) if isinstance(orientation, int) else None
    return img if turn is None else img.transpose(Image.Transpose[turn])


def auto_size(width: int, height: int, limits: LimitsConfig, max_side: int | None,
              param: str = "image") -> tuple[int, int]:
    """The output size for ``size: auto``: the image's own, scaled down to fit the limits (aspect kept), each side
    rounded down to a multiple of 16."""
    scale, limit = 1.0, None
    if width * height > limits.max_pixels:
        scale, limit = math.sqrt(limits.max_pixels / (width * height)), f"limits.max_pixels = {limits.max_pixels}"
    if max_side and max(width, height) * scale > max_side:
        scale, limit = max_side / max(width, height), f"at most {max_side} pixels per side"
    w = int(width * scale) // MULTIPLE * MULTIPLE
    h = int(height * scale) // MULTIPLE * MULTIPLE
    if min(width, height) < MULTIPLE:
        raise InvalidRequestError(f"image is {width}x{height}: each side must be at least {MULTIPLE} pixels "
                                  f"(or send a size)", param=param)
    if w < MULTIPLE or h < MULTIPLE:  # both sides are long enough, but the image is too narrow to scale down
        raise InvalidRequestError(
            f"image is {width}x{height}: scaled down to fit the output size limit ({limit}), its shorter side would "
            f"be {int(min(width, height) * scale)} pixels, under {MULTIPLE}; crop it to a less extreme aspect ratio "
            f"or send a size", param=param)
    return w, h


@dataclass(frozen=True)
class EditInputs:
    """What an edit's files turn into: per image a uint8 ``[H, W, 3]`` array at the output size, the first image's
    mask as uint8 ``[H, W]`` (255 = repaint) or None."""

    width: int
    height: int
    images: list
    mask: object = None


def _rgb_array(data, param: str, limits: LimitsConfig, size: tuple[int, int] | None,
               max_side: int | None = None, size_param: str = "image") -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one image and bring it to the output size (``size``, or None: ``auto_size`` of its own size) as
    uint8 ``[H, W, 3]``; -> (the array, the image's own size after orientation). All in this one frame, so each
    full-size intermediate (decoded, converted) is freed as soon as the next exists."""
    from PIL import Image

    img = open_image(data, param, limits)
    own = img.size
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = size if size is not None else auto_size(*own, limits, max_side, size_param)
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy(), own


def _mask_array(data, image_size: tuple[int, int], width: int, height: int, limits: LimitsConfig) -> np.ndarray:
    """The mask file -> uint8 ``[H, W]`` at the output size, 255 where its alpha is 0 (repaint)."""
    from PIL import Image

    mask_img = open_image(data, "mask", limits)
    if mask_img.mode == "P" and "transparency" in mask_img.info:
        mask_img = mask_img.convert("RGBA")
    if mask_img.mode not in ("RGBA", "RGBa", "LA", "La", "PA"):
        raise InvalidRequestError("mask has no alpha channel: its fully transparent pixels (alpha 0) mark the "
                                  "area to edit; send a PNG with transparency", param="mask")
    if mask_img.size != image_size:
        raise InvalidRequestError(f"mask is {mask_img.size[0]}x{mask_img.size[1]} but image is "
                                  f"{image_size[0]}x{image_size[1]}; they must have the same dimensions",
                                  param="mask")
    alpha = mask_img.getchannel("A")
    del mask_img
    if alpha.size != (width, height):
        alpha = alpha.resize((width, height), Image.Resampling.NEAREST)
    return np.where(np.asarray(alpha) == 0, 255, 0).astype(np.uint8)


def prepare_edit(images: list, mask, size: tuple[int, int] | None, limits: LimitsConfig,
                 max_side: int | None = None, param: str = "image", others: tuple = ()) -> EditInputs:
    """Decode and check the files of an edit and bring them to the output size (the module's table). ``size``:
    the request's (width, height), already validated, or None for auto. ``param``: the images' field name in
    errors (``images`` in a JSON edit). ``others``: the request's other input images ``[(param, data)]`` (its
    control image), counted in ``limits.max_request_input_pixels`` with these.

    The pixel total is checked from the headers first; then the images are decoded one at a time, each resized to
    the output size and its full-size decode dropped before the next is read."""
    if not images:
        raise InvalidRequestError(f"{param} is required: send one or more image files", param=param)
    if len(images) > MAX_IMAGES:
        raise InvalidRequestError(f"{len(images)} images sent; at most {MAX_IMAGES}", param=param)
    check_request_pixels([(param, d) for d in images] + [("mask", mask)] + list(others), limits, param)
    first, first_size = _rgb_array(images[0], param, limits, size, max_side, param)
    height, width = first.shape[:2]
    out_mask = None if mask is None else _mask_array(mask, first_size, width, height, limits)
    arrays = [first]
    for data in images[1:]:
        arrays.append(_rgb_array(data, param, limits, (width, height))[0])
    return EditInputs(width, height, arrays, out_mask)
