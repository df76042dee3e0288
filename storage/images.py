"""Image sources (a folder, a split CSV, or a URL of either) and image decoding."""
from __future__ import annotations

import errno
import io
import logging
import os
import posixpath
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from .locations import absolute, filesystem, for_log, has_credentials, is_below, is_local, location

logger = logging.getLogger("patchwatch.listing")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
TIFF_SUFFIXES = (".tif", ".tiff")
# PIL's decompression-bomb guard (a warning above 89 M pixels, an error above twice that) is replaced
# by one limit, checked from the header before any pixel is decoded: a PNG/JPEG/... is decoded whole
# (pixels x channels bytes, about twice that while PIL converts it), once per run. Larger images must
# come as tiled TIFFs, which are read region by region with no limit.
MAX_PIXELS_ENV = "PATCHWATCH_MAX_IMAGE_PIXELS"
DEFAULT_MAX_PIXELS = 1 << 30  # 32768 x 32768
Image.MAX_IMAGE_PIXELS = None
# a large non-TIFF image is staged once as a Zarr array of these chunks; the tile tasks read regions
STAGE_CHUNK = 256
SPLIT_COLUMNS = ("image", "mask", "label", "defect_type", "split")


class ImageReadError(Exception):
    """An image or mask that cannot be used; names the file and the reason."""

    def __init__(self, uri: str, reason: str):
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason


@dataclass(frozen=True)
class ImageRecord:
    image_id: str                  # stable key: the path relative to the source
    uri: str
    mask_uri: str | None = None
    label: str | None = None       # "good" / "defect" where known
    defect_type: str | None = None
    split: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Listing:
    """What listing a source found: the records, and what a person should hear about it."""

    records: list[ImageRecord]
    warnings: list[str] = field(default_factory=list)   # duplicates, labels read case-insensitively
    refused: list[str] = field(default_factory=list)    # rows the source policy refused, one line each


class SourceError(ValueError):
    """An image source that cannot be used as given; the message names the file and the reason."""


LABELS = ("good", "defect")
ALLOW_SOURCES_ENV = "PATCHWATCH_ALLOW_SOURCES"


def allowed_sources(text: str | None = None) -> list[str]:
    """Locations a split CSV may name besides its own folder: ``--allow-sources`` (the CLI sets
    ``PATCHWATCH_ALLOW_SOURCES`` from it, so that the flow process reads the same list)."""
    text = os.environ.get(ALLOW_SOURCES_ENV, "") if text is None else text
    return [absolute(p.strip()) for p in text.split(",") if p.strip()]


def list_images(source: str, split: str | None = None) -> list[ImageRecord]:
    """Records of a split CSV (optionally one split) or of every image below a folder; what
    :func:`scan_source` has to say goes to the ``patchwatch.listing`` logger."""
    listing = scan_source(source, split)
    for line in listing.warnings:
        logger.warning(line)
    for line in listing.refused:
        logger.error(line)
    return listing.records


def scan_source(source: str, split: str | None = None, allow: list[str] | None = None) -> Listing:
    """List a split CSV (optionally one split) or every image below a folder.

    Raises :class:`SourceError` (one line naming the file) when nothing can be listed: a missing
    source, an empty or header-only CSV, ``split`` without a split column, unknown labels, or
    no image at all.
    """
    if str(source).lower().endswith(".csv"):
        listing = _list_split_csv(source, split, allowed_sources() if allow is None else allow)
    else:
        listing = Listing(_list_folder(source))
        if not listing.records:
            raise SourceError(f"{for_log(source)}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return listing


def _list_folder(source: str) -> list[ImageRecord]:
    fs, root = filesystem(source)
    if not fs.exists(root):
        raise FileNotFoundError(f"image source {for_log(source)} does not exist")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    records = []
    for path in sorted(fs.find(root)):
        if path.lower().endswith(IMAGE_SUFFIXES):
            relative = posixpath.relpath(path, root)
            uri = path if protocol in ("file", "local") else f"{protocol}://{path}"
            records.append(ImageRecord(image_id=relative, uri=uri))
    return records


def _read_split_csv(source: str) -> pd.DataFrame:
    fs, path = filesystem(source)
    if not fs.exists(path):
        raise FileNotFoundError(f"split CSV {for_log(source)} does not exist")
    try:
        with fs.open(path, "rb") as handle:
            return pd.read_csv(handle, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise SourceError(f"{for_log(source)}: empty file; a split CSV needs the header "
                          f"{','.join(SPLIT_COLUMNS)} and one row per image") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise SourceError(f"{for_log(source)}: not a readable CSV ({_short(error, 120)})") from None


def _rows(lines: list[int], limit: int = 5) -> str:
    shown = ", ".join(map(str, lines[:limit]))
    return f"row {shown}" if len(lines) == 1 else f"rows {shown}" + (f" and {len(lines) - limit} more" if len(lines) > limit else "")


def _list_split_csv(source: str, split: str | None, allow: list[str]) -> Listing:
    """Rows are numbered as in a spreadsheet: the header is row 1, the first image row 2."""
    name = for_log(source)
    table = _read_split_csv(source)
    if "image" not in table.columns:
        raise SourceError(f"{name}: no 'image' column (columns: {', '.join(map(for_log, table.columns))}); "
                          f"expected {','.join(SPLIT_COLUMNS)}")
    if not len(table):
        raise SourceError(f"{name}: header only, no rows")
    table.index = range(2, len(table) + 2)
    warnings = _check_labels(table, name)
    if split is not None:
        if "split" not in table.columns:
            raise SourceError(f"{name}: no 'split' column, so --split {for_log(split)} would select nothing")
        present = sorted(set(table["split"]))
        table = table[table["split"] == split]
        if not len(table):
            raise SourceError(f"{name}: no row has split {for_log(split)!r} (splits present: "
                              f"{', '.join(for_log(s) or repr(s) for s in present)})")
    base = str(source).rsplit("/", 1)[0] if "/" in str(source) else "."
    policy = SourcePolicy(source, allow)

    def resolve(path: str) -> str:  # relative paths are relative to the CSV's folder
        return path if path.startswith("/") or "://" in path else f"{base}/{path}"

    records, refused, seen = [], [], {}
    for line, row in zip(table.index, table.to_dict("records")):
        if not row["image"].strip():
            refused.append(f"{name} row {line}: no image path")
            continue
        uri = resolve(row["image"])
        mask = row.get("mask") or None
        mask_uri = resolve(mask) if mask else None
        why = policy.refusal(uri) or (policy.refusal(mask_uri) if mask_uri else None)
        if why:
            refused.append(f"{name} row {line}: {why}")
            continue
        key = location(uri)
        if key in seen:
            seen[key][1].append(line)
            continue
        seen[key] = (len(records), [line])
        records.append(ImageRecord(
            image_id=row["image"], uri=uri, mask_uri=mask_uri, label=row.get("label") or None,
            defect_type=row.get("defect_type") or None, split=row.get("split") or None))
    for index, lines in seen.values():
        if len(lines) > 1:  # scored once: a second row would only repeat its score and weigh it twice
            warnings.append(f"{name}: {for_log(records[index].image_id)} is listed on {_rows(lines)}; "
                            f"used once (row {lines[0]})")
    if not records:
        raise SourceError(f"{name}: no usable rows ({len(refused)} refused"
                          + (f"; first: {refused[0]}" if refused else "") + ")")
    return Listing(records, warnings, refused)


def _check_labels(table: pd.DataFrame, name: str) -> list[str]:
    """Labels are ``good``, ``defect`` or empty; another case (``DEFECT``) is read as its lower
    case with a warning; anything else refuses the file (an evaluation on guessed labels would
    report numbers that mean nothing)."""
    if "label" not in table.columns:
        return []
    stripped = table["label"].str.strip()
    lowered = stripped.str.lower()
    unknown = table.index[(stripped != "") & ~lowered.isin(LABELS)].tolist()
    if unknown:
        values = sorted(set(stripped[unknown]))
        raise SourceError(f"{name}: label {', '.join(repr(for_log(v)) for v in values[:5])} on {_rows(unknown)} "
                          f"is not one of {', '.join(LABELS)} (or empty)")
    warnings = []
    for value in sorted(set(table["label"][(table["label"] != lowered) & (stripped != "")])):
        lines = table.index[table["label"] == value].tolist()
        warnings.append(f"{name}: label {for_log(value)!r} on {_rows(lines)} read as {lowered[lines[0]]!r}")
    table["label"] = lowered
    return warnings


class SourcePolicy:
    """Where a split CSV's entries may point. A CSV is data, not configuration: by default its
    entries stay inside the CSV's own store (below its folder; for an object store, in its
    bucket). Other locations need ``--allow-sources PREFIX``; ``http(s)://`` and ``file://`` URLs
    and URLs with credentials are refused unless a prefix allows them (credentials: never)."""

    def __init__(self, source: str, allow: list[str]):
        self.source, self.allow = source, list(allow)
        protocol, path = location(source)
        self.protocol = protocol
        self.folder = str(source).rsplit("/", 1)[0] if "/" in str(source) else "."
        folder = path.rsplit("/", 1)[0] if "/" in path else ""
        self.home = folder if protocol == "file" else folder.split("/", 1)[0]  # the CSV's folder / bucket

    def refusal(self, uri: str) -> str | None:
        """Why ``uri`` may not be read (None: it may)."""
        shown = for_log(uri)
        if has_credentials(uri):
            return f"{shown}: credentials in a URL are not accepted (configure the store instead)"
        if any(is_below(uri, prefix) for prefix in [self.folder, *self.allow]):
            return None
        protocol, path = location(uri)
        hint = f"; to allow it: --allow-sources PREFIX ({ALLOW_SOURCES_ENV})"
        if str(uri).lower().startswith(("http://", "https://", "file://")):
            return f"{shown}: {str(uri).split(':', 1)[0].lower()}:// URLs are not allowed{hint}"
        if protocol != self.protocol:
            return f"{shown}: outside the CSV's store ({protocol}, not {self.protocol}){hint}"
        if self.protocol == "file":
            inside = path.startswith(self.home.rstrip("/") + "/")
        else:
            inside = path.split("/", 1)[0] == self.home
        return None if inside else f"{shown}: outside the CSV's {'folder' if protocol == 'file' else 'bucket'}{hint}"


def decode_image(data: bytes, uri: str) -> np.ndarray:
    """Pixels of an encoded image: (H, W) grey or (H, W, 3) RGB, integer or float.

    16-bit, palette, CMYK and alpha images are converted rather than refused; anything that is
    not a whole, decodable image raises :class:`ImageReadError` naming the file.
    """
    if not data:
        raise ImageReadError(uri, "empty file (0 bytes)")
    if uri.lower().endswith(TIFF_SUFFIXES):
        import tifffile
        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tiff:
                _refuse_pages(tiff, uri)
                array = tiff.asarray()
                if tiff.pages[0].planarconfig == tifffile.PLANARCONFIG.SEPARATE and array.ndim == 3:
                    array = np.moveaxis(array, 0, -1)  # (samples, H, W) -> (H, W, samples)
        except ImageReadError:
            raise
        except Exception as error:  # tifffile raises many types for corrupt files
            raise ImageReadError(uri, f"not a readable TIFF ({_short(error)})") from error
        return _check_array(array, uri)
    try:
        with Image.open(io.BytesIO(data)) as image:
            check_pixel_count(image.height, image.width, uri)
            image.load()
            # a camera's EXIF orientation: the photo is scored (and its mask read) as it is shown
            oriented = ImageOps.exif_transpose(image) if _orientation(image) > 1 else image
            return _check_array(_pil_to_array(oriented), uri)
    except ImageReadError:
        raise
    except UnidentifiedImageError as error:
        raise ImageReadError(uri, "not an image file (unrecognised format)") from error
    except Image.DecompressionBombError as error:
        raise ImageReadError(uri, "too many pixels to decode safely (decompression bomb?)") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageReadError(uri, f"truncated or corrupt image ({_short(error)})") from error
    except Exception as error:  # a decoder bug on a hostile file must cost one line, not the batch
        raise ImageReadError(uri, f"cannot decode image ({type(error).__name__}: {_short(error)})") from error


EXIF_ORIENTATION = 0x0112


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1: as stored; 5-8 swap width and height), 1 when absent or unreadable."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
        return value if isinstance(value, int) and 1 <= value <= 8 else 1
    except Exception:  # a broken EXIF block must not refuse an otherwise good image
        return 1


def _oriented_shape(image: Image.Image) -> tuple[int, int]:
    """(height, width) as decoded: EXIF orientations 5-8 turn the image by 90 degrees."""
    return (image.width, image.height) if _orientation(image) >= 5 else (image.height, image.width)


def _refuse_pages(tiff, uri: str) -> None:
    """A multi-page TIFF (a stack, a scan series) is refused, naming its page count: which page is
    "the image" is not ours to guess, and reading all as one array made a (pages, H, W) "image".
    Reduced-resolution pages (a pyramid's levels, thumbnails) are not pages of their own."""
    pages = len(tiff.pages)
    if pages > 1:
        full = sum(1 for page in tiff.pages if not getattr(page, "is_reduced", False))
        if full > 1:
            raise ImageReadError(uri, f"multi-page TIFF ({full} pages); patchwatch reads one image per file: "
                                      f"save each page as its own file")


def max_pixels() -> int:
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    try:
        return int(text) if text else DEFAULT_MAX_PIXELS
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV}={text!r}: expected a whole number of pixels") from None


def check_pixel_count(height: int, width: int, uri: str) -> None:
    """Refuse (ImageReadError) a non-TIFF image above the decode limit, from its header's size."""
    limit = max_pixels()
    if height * width > limit:
        raise ImageReadError(uri, f"{width} x {height} = {height * width:,} pixels is above the decode limit of "
                                  f"{limit:,} ({MAX_PIXELS_ENV}); convert it to a tiled TIFF, which is read "
                                  f"region by region")


def _short(error: BaseException, limit: int = 60) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pil_to_array(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image)
        return array.astype(np.uint16) if array.max(initial=0) <= 65535 else array.astype(np.float32)
    if image.mode == "F":
        return np.asarray(image, dtype=np.float32)
    if image.mode in ("L", "RGB"):
        return np.asarray(image)
    if image.mode in ("1",):
        return np.asarray(image.convert("L"))
    if image.mode in ("LA",):
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))  # P, RGBA, CMYK, YCbCr, ...


def _check_array(array: np.ndarray, uri: str) -> np.ndarray:
    if array.ndim not in (2, 3) or min(array.shape[:2]) < 1:
        raise ImageReadError(uri, f"unsupported image shape {array.shape}")
    if array.ndim == 3 and array.shape[2] > 4:  # e.g. a multispectral TIFF: no band is "the" image
        raise ImageReadError(uri, f"{array.shape[2]} channels per pixel; patchwatch reads grey, RGB or RGBA")
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        return _float_to_unit(array, uri)
    return array


def _float_to_unit(array: np.ndarray, uri: str) -> np.ndarray:
    """Float pixels as float32 in [0, 1], the range the model reads floats in.

    The rule: values within [0, 1] are taken as they are; within [0, 255], divided by 255 (an
    8-bit image saved as float scores as the 8-bit one does); anything else is stretched from
    the image's own minimum to its maximum (a constant image becomes 0). NaN or infinite values
    refuse the file: a NaN pixel makes a NaN score that no threshold flags, and a NaN row in a
    fit's memory corrupts every score after it.
    """
    if np.iscomplexobj(array):
        raise ImageReadError(uri, "complex-valued pixels (not an image)")
    finite = np.isfinite(array)
    if not finite.all():
        bad = array[~finite]
        kinds = [k for k, present in (("NaN", np.isnan(bad).any()), ("infinite", np.isinf(bad).any())) if present]
        raise ImageReadError(uri, f"{' and '.join(kinds)} pixel values ({bad.size} of {array.size} pixels)")
    array = array.astype(np.float32, copy=False)
    low, high = float(array.min()), float(array.max())
    if low >= 0 and high <= 1:
        return array
    if low >= 0 and high <= 255:
        return array / np.float32(255)
    return (array - low) / np.float32(high - low) if high > low else np.zeros_like(array)


def file_error(uri: str, error: OSError) -> ImageReadError:
    """The named, short reason for an OS-level failure to read ``uri``."""
    if isinstance(error, FileNotFoundError):
        return ImageReadError(uri, "file not found")
    if isinstance(error, PermissionError):
        return ImageReadError(uri, "permission denied")
    if isinstance(error, IsADirectoryError):
        return ImageReadError(uri, "is a directory")
    if error.errno == errno.ELOOP:
        return ImageReadError(uri, "symlink loop")
    return ImageReadError(uri, f"cannot read file ({_short(error.strerror or error)})")


def read_image(uri: str) -> np.ndarray:
    fs, path = filesystem(uri)
    try:
        data = fs.cat_file(path)
    except OSError as error:
        raise file_error(uri, error) from error
    return decode_image(data, uri)


def read_image_unless_large(uri: str, large) -> tuple[np.ndarray | None, tuple[int, int]]:
    """(pixels, (height, width)) of the image at ``uri``, or (None, shape) when ``large(height,
    width)`` says it is to be tiled: a large image is never decoded here (a TIFF is read region by
    region later, any other format decoded once by :func:`stage_image`). One read of the file."""
    if uri.lower().endswith(TIFF_SUFFIXES):
        shape = image_shape(uri)  # from the header: never decode a huge TIFF whole
        return (None, shape) if large(*shape) else (image := read_image(uri), tuple(image.shape[:2]))
    fs, path = filesystem(uri)
    try:
        data = fs.cat_file(path)
    except OSError as error:
        raise file_error(uri, error) from error
    try:
        with Image.open(io.BytesIO(data)) as header:
            shape = _oriented_shape(header)
    except Exception:  # not an image PIL knows: decode_image names the reason
        shape = None
    if shape is not None and large(*shape):
        check_pixel_count(*shape, uri)  # refused now, as an error row, rather than in the staging task
        return None, shape
    image = decode_image(data, uri)
    return image, tuple(image.shape[:2])


def staged_location(root: str, uri: str) -> str:
    """Where the decoded pixels of ``uri`` are staged under ``root``: keyed by the file's content
    stamp, so a re-run's score-tiles cache keys (which include this location) stay valid."""
    from .locations import join
    from .results_store import source_stamp

    return join(root, "scratch", "large", f"{source_stamp([uri])[:32]}.zarr")


def stage_image(uri: str, location: str) -> tuple[int, int]:
    """Decode the (non-TIFF) image at ``uri`` once and write its pixels to a chunked Zarr array at
    ``location``, which :class:`LargeImage` then reads region by region. Returns its shape."""
    import zarr

    pixels = read_image(uri)
    array = zarr.create_array(location, shape=pixels.shape, dtype=pixels.dtype, overwrite=True, zarr_format=3,
                              chunks=(STAGE_CHUNK, STAGE_CHUNK, *pixels.shape[2:]))
    for top in range(0, pixels.shape[0], STAGE_CHUNK * 8):  # bounded encode buffers
        array[top:top + STAGE_CHUNK * 8] = pixels[top:top + STAGE_CHUNK * 8]
    return tuple(pixels.shape[:2])


def remove_staged(location: str) -> None:
    """Remove a staged copy (and its local scratch folders once empty); a missing one is fine."""
    fs, path = filesystem(location)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    if is_local(location):  # an object store has no folders to leave behind
        for folder in (posixpath.dirname(path), posixpath.dirname(posixpath.dirname(path))):
            try:
                os.rmdir(folder)  # only when empty: another image may be staged there right now
            except OSError:
                break


def read_mask(uri: str, shape: tuple[int, int]) -> np.ndarray:
    """Ground-truth mask as bool (pixel > 127 is defect), checked against the image's shape."""
    mask = read_image(uri)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if mask.shape != tuple(shape):
        raise ImageReadError(uri, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]}")
    if np.issubdtype(mask.dtype, np.integer) and mask.dtype.itemsize > 1:
        return mask > (np.iinfo(mask.dtype).max // 2)
    return mask > 127


class LargeImage:
    """An image read region by region: tiled TIFF/BigTIFF lazily through tifffile's Zarr view
    (a 40,000 x 40,000 scan never sits whole in memory); another format from its staged copy
    (``staged``: the Zarr array :func:`stage_image` wrote), or, without one, decoded whole here."""

    def __init__(self, uri: str, staged: str | None = None):
        self.uri = uri
        self._handle = self._tiff = None
        if staged:
            import zarr

            try:
                self._pixels = zarr.open_array(staged, mode="r", zarr_format=3)
            except FileNotFoundError as error:
                raise ImageReadError(uri, "its staged copy is gone (the run's scratch folder was removed?)") from error
        elif uri.lower().endswith(TIFF_SUFFIXES):
            import tifffile
            import zarr

            fs, path = filesystem(uri)
            try:
                self._handle = fs.open(path, "rb")
                self._tiff = tifffile.TiffFile(self._handle)
                self._pixels = zarr.open(self._tiff.pages[0].aszarr(), mode="r")
            except FileNotFoundError as error:
                self.close()
                raise ImageReadError(uri, "file not found") from error
            except Exception as error:  # tifffile raises many types for corrupt files
                self.close()
                raise ImageReadError(uri, f"not a readable TIFF ({error})") from error
        else:
            self._pixels = read_image(uri)
        self.shape = tuple(self._pixels.shape[:2])

    def read(self, top: int, left: int, bottom: int, right: int) -> np.ndarray:
        try:
            return np.asarray(self._pixels[top:bottom, left:right])
        except Exception as error:
            raise ImageReadError(self.uri, f"cannot read region {top}:{bottom}, {left}:{right} ({error})") from error

    def strided(self, step: int) -> np.ndarray:
        """Every ``step``-th pixel of every ``step``-th row, for a preview: read from the staged
        copy or the tiled TIFF chunk by chunk, never decoded whole again."""
        try:
            return np.asarray(self._pixels[::step, ::step])
        except Exception as error:
            raise ImageReadError(self.uri, f"cannot read it at 1/{step} ({error})") from error

    def close(self) -> None:
        if self._tiff is not None:
            self._tiff.close()
        if self._handle is not None:
            self._handle.close()
        self._tiff = self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def image_shape(uri: str) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding the pixels."""
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as handle:
            if uri.lower().endswith((".tif", ".tiff")):
                import tifffile
                with tifffile.TiffFile(handle) as tiff:
                    _refuse_pages(tiff, uri)
                    return tuple(tiff.pages[0].shape[:2])
            with Image.open(handle) as image:
                return _oriented_shape(image)
    except (FileNotFoundError, PermissionError, IsADirectoryError) as error:
        raise file_error(uri, error) from error
    except ImageReadError:
        raise
    except UnidentifiedImageError as error:
        raise ImageReadError(uri, "not an image file (unrecognised format)") from error
    except Exception as error:
        raise ImageReadError(uri, f"cannot read image header ({error})") from error
