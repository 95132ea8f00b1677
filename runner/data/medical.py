"""DICOM files and NIfTI volumes as images: Hounsfield rescale, CT windows, MONOCHROME1, VOI LUTs,
and volumes (NIfTI, multi-frame DICOM) as one image a slice.

A slice of a volume is an item whose key is the file's relative path, `#`, and the slice's index
(`ct/vol01.nii.gz#0042`); its group is the file, so the slices of one volume never cross splits.

The window (DICOM PS3.3 C.11.2.1.2.1, VOI LUT Function LINEAR), from a stored value x after the
rescale (HU for CT), a level c and a width w >= 1, to 0..255:
    x <= c - 0.5 - (w - 1) / 2  ->  0
    x >  c - 0.5 + (w - 1) / 2  ->  255
    otherwise                   ->  round(((x - (c - 0.5)) / (w - 1) + 0.5) * 255)
With no window set, a DICOM file's own window (WindowCenter/WindowWidth, its first pair) or VOI LUT
is applied, else the image's own range is scaled to 0..255 (a NIfTI volume's range, for all its
slices alike). MONOCHROME1 (bright = low values, as some X-ray systems store) is inverted after the
window, so bright means dense in every image.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from dataclasses import dataclass

import numpy as np

DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
# Named CT windows, (level, width) in HU, as radiology references give them (e.g. Radiopaedia, "Windowing (CT)").
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40, 80),
    "subdural": (80, 200),
    "stroke": (40, 40),
    "bone": (600, 2800),
    "lung": (-600, 1500),
    "soft_tissue": (50, 400),
}
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # of the volume in nibabel's closest canonical (RAS+) orientation
MAX_VOLUME_BYTES = 1 << 30  # a decompressed NIfTI volume: as large as an uncompressed file may be (decode.MAX_IMAGE_BYTES)
_SLICE = re.compile(r"^(.*)#(\d+)$")


def medical_kind(name: str) -> str | None:
    """'dicom' or 'nifti' by a file name's extension, else None."""
    low = name.lower()
    if low.endswith(NIFTI_EXTENSIONS):
        return "nifti"
    if low.endswith(DICOM_EXTENSIONS):
        return "dicom"
    return None


def sniff_dicom(path: str) -> bool:
    """A file with the DICOM preamble's magic 'DICM' at byte 128 (files without an extension, as scanners write them)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def file_kind(path: str) -> str | None:
    """'dicom' or 'nifti' by the name, or 'dicom' for a file with no extension that carries the DICOM
    preamble (as scanners name them); None for any other file."""
    kind = medical_kind(path)
    if kind is None and os.path.splitext(os.path.basename(path))[1] == "" and os.path.isfile(path) and sniff_dicom(path):
        return "dicom"
    return kind


def split_key(key: str) -> tuple[str, int | None]:
    """(the file's key, the slice index) of an item key; (key, None) for a whole file. A key given as
    a path names a frame of an extensionless DICOM file too (`IM0001#0002`, when `IM0001` is one)."""
    m = _SLICE.match(key)
    if m and file_kind(m.group(1)) is not None:
        return m.group(1), int(m.group(2))
    return key, None


def slice_keys(key: str, count: int) -> list[str]:
    width = max(4, len(str(count - 1)))
    return [f"{key}#{i:0{width}d}" for i in range(count)]


def window_to_uint8(x: np.ndarray, level: float, width: float) -> np.ndarray:
    """The linear VOI window of the module docstring, to uint8."""
    x = np.asarray(x, dtype=np.float64)
    w = max(float(width), 1.0)
    c = float(level)
    if w == 1.0:
        return np.where(x <= c - 0.5, 0, 255).astype(np.uint8)
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    y = np.where(x <= c - 0.5 - (w - 1) / 2, 0.0, np.where(x > c - 0.5 + (w - 1) / 2, 255.0, y))
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def range_to_uint8(x: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    lo = float(x.min()) if lo is None else lo
    hi = float(x.max()) if hi is None else hi
    if not hi > lo:
        return np.zeros(x.shape, np.uint8)
    return np.clip(np.rint((x - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


class MedicalError(ValueError):
    """A file this module cannot turn into an image: the message is the reason, for one line."""


@dataclass
class Slice:
    """One decoded 2-D image: uint8 (H, W), or (H, W, 3) for colour or several windows."""

    pixels: np.ndarray
    mode: str  # e.g. 'DICOM MONOCHROME2', 'NIfTI'
    native_size: tuple[int, int]
    several_windows: bool = False


# ---- DICOM -------------------------------------------------------------------------------------

_PLUGINS = {  # what pydicom needs to decode compressed pixel data, by transfer syntax name
    "JPEG 2000": "pylibjpeg pylibjpeg-openjpeg",
    "JPEG-LS": "pylibjpeg pylibjpeg-libjpeg",
    "JPEG": "pylibjpeg pylibjpeg-libjpeg",
    "High-Throughput JPEG 2000": "pylibjpeg pylibjpeg-openjpeg",
}


def _plugin_for(ts_name: str) -> str:
    for prefix in sorted(_PLUGINS, key=len, reverse=True):
        if prefix in ts_name:
            return _PLUGINS[prefix]
    return "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    text = re.sub(r"<[^<>]* object at 0x[0-9a-fA-F]+>", "it", text)  # a reader's in-memory buffer: the caller names the file
    return text if len(text) <= 300 else text[:297] + "..."


def read_dicom_header(path: str, keywords: tuple[str, ...] = ()) -> dict:
    """NumberOfFrames (1 when absent) and the named attributes of a DICOM file, its pixel data unread."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, TypeError, AttributeError, KeyError) as e:
        raise MedicalError(f"not a readable DICOM file: {e}") from None
    out = {"frames": int(getattr(ds, "NumberOfFrames", 1) or 1)}
    for kw in keywords:
        v = getattr(ds, kw, None)
        out[kw] = None if v is None or str(v).strip() == "" else str(v).strip()
    return out


def _first(v) -> float | None:  # noqa: ANN001 - a DICOM value: a number or a MultiValue of them
    if v is None:
        return None
    try:
        return float(v[0]) if hasattr(v, "__len__") and not isinstance(v, (str, bytes)) else float(v)
    except (TypeError, ValueError, IndexError):
        return None


def _frame_item(ds, index: int, group: str, item: str):  # noqa: ANN001, ANN202
    """An attribute of an enhanced (multi-frame) file's functional groups: the frame's own, else the shared one."""
    for seq_name, i in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        seq = getattr(ds, seq_name, None)
        if seq is not None and len(seq) > i and group in seq[i] and len(seq[i][group].value) > 0:
            inner = seq[i][group].value[0]
            if item in inner:
                return inner[item].value
    return None


def _rescale(ds, index: int, arr: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """Stored values to modality values (HU for CT): RescaleSlope/Intercept, a frame's own in an
    enhanced file, or a Modality LUT."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    slope = _first(getattr(ds, "RescaleSlope", None))
    intercept = _first(getattr(ds, "RescaleIntercept", None))
    if slope is None and intercept is None:
        slope = _first(_frame_item(ds, index, "PixelValueTransformationSequence", "RescaleSlope"))
        intercept = _first(_frame_item(ds, index, "PixelValueTransformationSequence", "RescaleIntercept"))
    return arr.astype(np.float64) * (1.0 if slope is None else slope) + (0.0 if intercept is None else intercept)


def _voi_lut(ds, values: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """The file's first VOI LUT applied to the modality values (integers, as a LUT indexes them), its
    output range (LUTDescriptor's bits) scaled to 0..255."""
    from pydicom.pixels import apply_voi_lut

    try:
        out = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0, prefer_lut=True)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError) as e:
        raise MedicalError(f"its VOI LUT cannot be applied: {_one_line(e)}") from None
    top = float(2 ** bits - 1) if 8 <= bits <= 16 else float(np.max(out))
    return range_to_uint8(out, 0.0, top)


def _own_window(ds, index: int) -> tuple[float, float] | None:  # noqa: ANN001
    c, w = _first(getattr(ds, "WindowCenter", None)), _first(getattr(ds, "WindowWidth", None))
    if c is None or w is None:
        c = _first(_frame_item(ds, index, "FrameVOILUTSequence", "WindowCenter"))
        w = _first(_frame_item(ds, index, "FrameVOILUTSequence", "WindowWidth"))
    return (c, w) if c is not None and w is not None and w >= 1 else None


def _quiet_pydicom() -> None:
    """pydicom logs a failed decode with its traceback; the reason is in this module's one line instead."""
    import logging

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def parse_dicom(data: bytes):  # noqa: ANN201 - a pydicom Dataset
    import pydicom

    _quiet_pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, TypeError, AttributeError, KeyError) as e:
        raise MedicalError(f"not a readable DICOM file: {e}") from None
    if len(ds) == 0 or (data[128:132] != b"DICM" and not any(k in ds for k in ("PixelData", "Rows", "SOPClassUID"))):
        raise MedicalError("not a DICOM file (no DICOM preamble, and no image attribute could be read)")
    return ds


def decode_dicom(ds, index: int | None, windows: tuple[tuple[float, float], ...] | None) -> Slice:  # noqa: ANN001
    import pydicom

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise MedicalError("a DICOM file with no pixel data (a report, a structured document or a header only)")
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if index is not None and not 0 <= index < frames:
        raise MedicalError(f"frame {index} asked of a DICOM file of {frames} frame(s)")
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        ds.file_meta = getattr(ds, "file_meta", pydicom.dataset.FileMetaDataset())
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian  # a file with no meta header: the default
    try:
        from pydicom.pixels import pixel_array

        arr = pixel_array(ds, index=index if frames > 1 else None)
    except (RuntimeError, NotImplementedError) as e:
        ts = ds.file_meta.TransferSyntaxUID
        if getattr(ts, "is_compressed", False) and "missing dependencies" in str(e):
            raise MedicalError(f"pixel data compressed as {ts.name}, which the installed pydicom cannot decode: "
                               f"pip install {_plugin_for(ts.name)}") from None
        raise MedicalError(f"the pixel data cannot be decoded: {_one_line(e)}") from None
    except (ValueError, AttributeError, KeyError, TypeError, IndexError) as e:
        raise MedicalError(f"the pixel data cannot be decoded: {_one_line(e)}") from None
    if frames > 1 and index is None and arr.ndim >= 3 and arr.shape[0] == frames:
        arr = arr[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    mode = f"DICOM {photometric}"
    if photometric == "PALETTE COLOR" and arr.ndim == 2:  # indices into the file's colour table
        from pydicom.pixels import apply_color_lut

        try:
            arr = apply_color_lut(arr, ds)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise MedicalError(f"its colour palette cannot be applied: {_one_line(e)}") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour (pydicom gives RGB for RGB and YBR files)
        rgb = arr[..., :3]
        out = rgb.astype(np.uint8) if rgb.dtype == np.uint8 else range_to_uint8(rgb)
        return Slice(out, mode, (out.shape[1], out.shape[0]))
    if arr.ndim != 2:
        raise MedicalError(f"pixel data of shape {tuple(arr.shape)}: not a 2-D image")
    values = _rescale(ds, index or 0, arr)
    if windows:
        channels = [window_to_uint8(values, c, w) for c, w in windows]
    elif "VOILUTSequence" in ds:
        channels = [_voi_lut(ds, values)]
    elif (own := _own_window(ds, index or 0)) is not None:
        channels = [window_to_uint8(values, *own)]
    else:
        channels = [range_to_uint8(values)]
    if photometric == "MONOCHROME1":
        channels = [255 - ch for ch in channels]
    pixels = channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)
    return Slice(pixels, mode, (pixels.shape[1], pixels.shape[0]), several_windows=len(channels) > 1)


# ---- NIfTI -------------------------------------------------------------------------------------


def _canonical_axis_length(img, axis: str) -> int:  # noqa: ANN001 - a nibabel image, header only
    from nibabel.orientations import io_orientation

    shape = img.shape
    if len(shape) == 2 or 1 in shape[:3]:  # a 2-D image, or one slice: one image whatever the axis
        return 1
    ornt = io_orientation(img.affine)
    want = AXES[axis]
    for i in range(3):
        if int(ornt[i, 0]) == want:
            return int(shape[i])
    return int(shape[want])


def nifti_slices(path: str, axis: str) -> int:
    """How many slices a NIfTI file holds along `axis` (its header only; 1 for a 2-D image)."""
    import nibabel as nib

    try:
        img = nib.load(path)
    except Exception as e:  # noqa: BLE001 - nibabel raises many kinds for a damaged header; the reason is the line
        raise MedicalError(f"not a readable NIfTI file: {e}") from None
    if len(img.shape) > 3 and any(n > 1 for n in img.shape[3:]):
        raise MedicalError(f"a {len(img.shape)}-D NIfTI of shape {img.shape} (a time series?): one 3-D volume a file is read")
    if _is_label_map(img):
        raise MedicalError("a label map (its header's intent is 'label'), not an image: a segmentation beside its volume?")
    return _canonical_axis_length(img, axis)


def _is_label_map(img) -> bool:  # noqa: ANN001
    try:
        return img.header.get_intent()[0] == "label"
    except Exception:  # noqa: BLE001 - an unknown intent code is not a label map
        return False


_LAST: dict = {}  # the last volume file parsed in this process: (path, size, mtime_ns) -> (file_sha, parsed)


def remembered(stamp: tuple) -> tuple | None:
    """(file_sha, parsed) of the volume file last parsed here, if `stamp` is still its (path, size,
    mtime_ns): a volume's slices are decoded one after another, and each would read the whole file."""
    return _LAST.get(stamp)


def remember(stamp: tuple, file_sha: str, parsed) -> None:  # noqa: ANN001 - a canonical array or a pydicom Dataset
    _LAST.clear()
    _LAST[stamp] = (file_sha, parsed)


def _read_nifti(data: bytes):  # noqa: ANN202
    import nibabel as nib

    if data[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as g:
                data = g.read(MAX_VOLUME_BYTES + 1)
        except (OSError, EOFError) as e:
            raise MedicalError(f"not a readable .nii.gz file: {e}") from None
        if len(data) > MAX_VOLUME_BYTES:
            raise MedicalError(f"the volume decompresses to more than {MAX_VOLUME_BYTES >> 30} GiB")
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return cls.from_bytes(data)
        except Exception:  # noqa: BLE001, S112 - not this version of the format: try the next
            continue
    raise MedicalError("not a readable NIfTI file (neither NIfTI-1 nor NIfTI-2)")


@dataclass
class Volume:
    """A NIfTI volume in nibabel's closest canonical orientation (RAS+), float32, scaled by scl_slope
    and scl_inter, with its range (the default window of its slices); a 2-D image or a single slice
    as a volume of one slice along the third axis."""

    data: np.ndarray
    lo: float
    hi: float


def nifti_volume(data: bytes) -> Volume:
    import nibabel as nib

    img = _read_nifti(data)
    if len(img.shape) > 3 and any(n > 1 for n in img.shape[3:]):
        raise MedicalError(f"a {len(img.shape)}-D NIfTI of shape {img.shape} (a time series?): one 3-D volume a file is read")
    if _is_label_map(img):
        raise MedicalError("a label map (its header's intent is 'label'), not an image: a segmentation beside its volume?")
    try:
        if sum(n > 1 for n in img.shape[:3]) < 2:
            raise MedicalError(f"a NIfTI of shape {img.shape}: not an image (fewer than two dimensions longer than 1)")
        if len(img.shape) == 2 or 1 in img.shape[:3]:
            vol = np.asarray(img.get_fdata(dtype=np.float32)).reshape([n for n in img.shape[:3] if n > 1][:2])[:, :, None]
        else:
            img = nib.as_closest_canonical(img)
            vol = np.asarray(img.get_fdata(dtype=np.float32)).reshape(img.shape[:3])
    except (ValueError, OSError, EOFError) as e:
        raise MedicalError(f"the volume's data cannot be read: {e}") from None
    return Volume(vol, float(vol.min()), float(vol.max()))


def decode_nifti(volume: Volume, index: int | None, axis: str, windows: tuple[tuple[float, float], ...] | None) -> Slice:
    """One slice along `axis`, shown as radiologists view a DICOM image of it: anterior (axial) or
    superior (coronal, sagittal) up, the patient's right on the image's left (axial, coronal) and
    anterior on the left (sagittal); a window as for CT, else the whole volume's range."""
    vol = volume.data
    ax = AXES[axis] if vol.shape[2] > 1 else 2
    n = vol.shape[ax]
    k = 0 if index is None else index
    if not 0 <= k < n:
        raise MedicalError(f"slice {k} asked of a volume of {n} along the {axis} axis")
    plane = np.fliplr(np.rot90(np.take(vol, k, axis=ax)))  # RAS+: rows from the top, columns from the patient's right
    if windows:
        channels = [window_to_uint8(plane, c, w) for c, w in windows]
    else:
        channels = [range_to_uint8(plane, volume.lo, volume.hi)]
    pixels = channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)
    return Slice(np.ascontiguousarray(pixels), "NIfTI", (pixels.shape[1], pixels.shape[0]), several_windows=len(channels) > 1)
