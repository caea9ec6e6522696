"""Reading and writing 3D medical volumes with their geometry.

Every file irisseg reads or writes goes through this module. A :class:`Volume` is a numpy array plus the
physical geometry that places it in patient space, with SimpleITK's conventions:

* ``array``: shape ``(D, H, W)``, i.e. SimpleITK's ``GetArrayFromImage`` order (z, y, x).
* ``spacing``: voxel size in mm, in SimpleITK's ``(x, y, z)`` order (so ``spacing[0]`` is the size along
  the last array axis). ``Volume.spacing_zyx`` gives it in array-axis order, as metrics and MONAI expect.
* ``origin``: physical position in mm of the centre of voxel ``array[0, 0, 0]``, ``(x, y, z)`` order.
* ``direction``: 3x3 direction cosines, row-major as SimpleITK stores them; column ``j`` is the physical
  direction of image axis ``j`` (x, y, z). Physical point of index ``(i, j, k)`` (x, y, z order) is
  ``origin + direction @ (spacing * (i, j, k))``.

Formats: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd`` by extension, and a folder holding a
DICOM series (read only). Writes are atomic: a failed write leaves nothing at the destination.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from irisseg.errors import InputError

__all__ = [
    "write_csv",
    "check_output_file",
    "Volume",
    "read_volume",
    "read_mask",
    "mask_channels",
    "write_volume",
    "write_dicom_series",
    "same_geometry",
    "check_same_geometry",
    "orientation_code",
    "volume_suffix",
    "SUFFIXES",
]

#: File endings irisseg reads and writes (a DICOM series is a folder, read only).
SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

_INTEGER_KINDS = "biu"


def _as_tuple3(values, what: str) -> tuple[float, float, float]:
    out = tuple(float(v) for v in np.asarray(values, dtype=float).reshape(-1))
    if len(out) != 3:
        raise InputError(f"{what} must have 3 values (x, y, z), got {len(out)}")
    return out  # type: ignore[return-value]


@dataclass
class Volume:
    """A 3D image or label map with its physical geometry.

    Arguments:
      array (np.ndarray): voxel values, shape (D, H, W) in SimpleITK array order (z, y, x).
      spacing (tuple[float, float, float]): voxel size in mm, (x, y, z) order.
      origin (tuple[float, float, float]): centre of voxel [0, 0, 0] in mm, (x, y, z) order.
      direction (np.ndarray): (3, 3) direction cosines, row-major as SimpleITK; identity by default.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise InputError(f"a Volume needs a 3D array (D, H, W), got shape {self.array.shape}")
        self.spacing = _as_tuple3(self.spacing, "spacing")
        self.origin = _as_tuple3(self.origin, "origin")
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if min(self.spacing) <= 0:
            raise InputError(f"spacing must be positive, got {self.spacing}")

    # -- geometry -------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (D, H, W)."""
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        """Image size in SimpleITK's (x, y, z) order, i.e. (W, H, D)."""
        return tuple(reversed(self.array.shape))  # type: ignore[return-value]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Voxel size in mm in array-axis order (D, H, W), as metrics and MONAI take it."""
        return tuple(reversed(self.spacing))  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (cm^3)."""
        return float(np.prod(self.spacing)) / 1000.0

    def with_array(self, array: np.ndarray) -> Volume:
        """A new Volume with ``array`` (same shape (D, H, W)) and this volume's geometry."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise InputError(f"array shape {array.shape} does not match the volume's {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy())

    def geometry(self) -> dict:
        """The geometry as a JSON-friendly dict: shape (D, H, W), spacing, origin, direction (row-major)."""
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": self.direction.reshape(-1).tolist(),
        }

    # -- labels ---------------------------------------------------------------------------------------
    @property
    def is_label_map(self) -> bool:
        """True when every voxel holds a non-negative integer value (integer dtype, or integral floats)."""
        a = self.array
        if a.dtype.kind == "b":
            return True
        if a.dtype.kind in _INTEGER_KINDS:
            return bool(a.size == 0 or a.min() >= 0)
        if a.dtype.kind == "f":
            return bool(np.all(np.isfinite(a)) and np.all(a == np.round(a)) and (a.size == 0 or a.min() >= 0))
        return False

    def labels(self) -> dict[int, int]:
        """Non-zero labels of a label map and their voxel counts, ``{label: count}``, sorted by label.

        Returns an empty dict for a volume that is not a label map (see :attr:`is_label_map`).
        """
        if not self.is_label_map:
            return {}
        values, counts = np.unique(self.array.astype(np.int64, copy=False), return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts) if v != 0}

    # -- SimpleITK ------------------------------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        """Build a Volume from a 3D scalar ``SimpleITK.Image`` (the array is a copy)."""
        if image.GetDimension() != 3:
            raise InputError(f"expected a 3D image, got a {image.GetDimension()}D image")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(
                f"expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} components per voxel"
            )
        return cls(
            sitk.GetArrayFromImage(image),
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=np.asarray(image.GetDirection(), dtype=float).reshape(3, 3),
        )

    def to_sitk(self) -> sitk.Image:
        """This volume as a ``SimpleITK.Image`` with the same geometry (bool arrays become uint8)."""
        array = self.array.astype(np.uint8) if self.array.dtype == bool else self.array
        image = sitk.GetImageFromArray(np.ascontiguousarray(array))
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(tuple(self.direction.reshape(-1)))
        return image

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        return f"Volume(shape={self.shape}, dtype={self.array.dtype}, spacing=({sp}), orientation={orientation_code(self)})"


# ---------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------
def volume_suffix(path: str | os.PathLike) -> str:
    """The file ending of ``path`` that irisseg recognises (e.g. ``".nii.gz"``), or ``""`` if none."""
    name = str(path).lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def _dicom_series_files(folder: Path, series_uid: str | None) -> list[str]:
    reader = sitk.ImageSeriesReader
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM prints C++ warnings for a folder without DICOM
    try:
        uids = list(reader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    if not uids:
        raise InputError(f"{folder}: folder holds no DICOM series (and no volume file)")
    if series_uid is None:
        if len(uids) > 1:
            raise InputError(
                f"{folder}: folder holds {len(uids)} DICOM series, choose one with its SeriesInstanceUID: "
                + ", ".join(sorted(uids))
            )
        series_uid = uids[0]
    elif series_uid not in uids:
        raise InputError(f"{folder}: no DICOM series {series_uid}; found: " + ", ".join(sorted(uids)))
    # GDCM sorts the slices by their position along the slice normal.
    files = list(reader.GetGDCMSeriesFileNames(str(folder), series_uid))
    if not files:
        raise InputError(f"{folder}: DICOM series {series_uid} has no readable slices")
    return files


def read_volume(
    path: str | os.PathLike,
    *,
    series_uid: str | None = None,
    allow_nan: bool = False,
) -> Volume:
    """Read a 3D volume with its geometry.

    Arguments:
      path: a ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` file, or a folder holding one
        DICOM series (slices are ordered by their position; with several series, pass ``series_uid``).
      series_uid (str | None): the SeriesInstanceUID to read from a folder with several series.
      allow_nan (bool): accept NaN or infinite intensities (rejected by default; note that ITK's NIfTI
        reader returns NaN voxels of a ``.nii``/``.nii.gz`` file as 0, so they are only detected, not kept).

    Returns:
      Volume: array (D, H, W) with the file's dtype, spacing/origin (x, y, z) in mm, direction (3, 3).
      For a label map, ``volume.labels()`` lists its labels and voxel counts.

    Raises:
      InputError: one line naming the file and the problem: missing, unreadable or corrupt, not 3D, several
        DICOM series, NaN intensities.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(_dicom_series_files(path, series_uid))
            image = reader.Execute()
        else:
            if not volume_suffix(path) and not _looks_like_dicom(path):
                raise InputError(
                    f"{path}: unsupported file type (use {', '.join(SUFFIXES)} or a DICOM series folder)"
                )
            image = sitk.ReadImage(str(path))
    except InputError:
        raise
    except RuntimeError as exc:  # SimpleITK reports every I/O failure as RuntimeError
        raise InputError(f"{path}: cannot read image ({_short_itk_message(exc)})") from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise InputError(
            f"{path}: expected a 3D volume, got a {image.GetDimension()}D image of size {image.GetSize()}"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path}: expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()} components "
            "(store each channel as its own file, e.g. case_0000.nii.gz, case_0001.nii.gz)"
        )
    volume = Volume.from_sitk(image)
    if min(volume.shape) < 1 or volume.array.size == 0:
        raise InputError(f"{path}: image is empty (size {volume.size_xyz})")
    if volume_suffix(path) in (".nii", ".nii.gz"):
        bad_index, bad_values = _scan_nifti(path)  # refuses a truncated file
        if bad_index.size and volume.array.dtype.kind == "f" and bad_index[-1] < volume.array.size:
            array = np.array(volume.array)  # ITK read these voxels as 0: put the stored values back
            array.reshape(-1)[bad_index] = bad_values
            volume = volume.with_array(array)
    if not allow_nan and volume.array.dtype.kind == "f":
        n_bad = int((~np.isfinite(volume.array)).sum())
        if n_bad:
            raise InputError(f"{path}: image contains {n_bad} NaN or infinite intensities")
    return volume


_NIFTI_FLOAT_TYPES = {16: np.float32, 64: np.float64}


def _nifti_header(head: bytes) -> tuple[str, int, int, int, int] | None:
    """(byte order, datatype, bits per voxel, voxel count, voxel-data offset) of a NIfTI-1 or -2 header,
    or None if ``head`` is not one."""
    for order in ("<", ">"):
        size = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0]) if len(head) >= 4 else 0
        if size == 348 and len(head) >= 348:  # NIfTI-1: dim int16[8] @40, datatype @70, bitpix @72, vox_offset f4 @108
            dims = np.frombuffer(head[40:56], f"{order}i2").astype(np.int64)
            datatype, bitpix = (int(v) for v in np.frombuffer(head[70:74], f"{order}i2"))
            offset = int(np.frombuffer(head[108:112], f"{order}f4")[0])
        elif size == 540 and len(head) >= 540:  # NIfTI-2: datatype @12, bitpix @14, dim int64[8] @16, vox_offset @168
            datatype, bitpix = (int(v) for v in np.frombuffer(head[12:16], f"{order}i2"))
            dims = np.frombuffer(head[16:80], f"{order}i8")
            offset = int(np.frombuffer(head[168:176], f"{order}i8")[0])
        else:
            continue
        if not 1 <= dims[0] <= 7 or (dims[1:dims[0] + 1] < 1).any() or bitpix < 8 or offset < size:
            return None
        return order, datatype, bitpix, int(np.prod(dims[1:dims[0] + 1])), offset
    return None


def _scan_nifti(path: Path, chunk: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Read a ``.nii`` / ``.nii.gz`` file's voxel data once, in chunks: refuse a truncated file, and return the
    flat (file-order) indices and values of NaN / infinite voxels of float data (empty otherwise).

    ITK's NIfTI reader fills the missing end of a truncated file with zeros, and reads NaN or infinite
    voxels as 0, so both would otherwise pass silently.

    Raises:
      InputError: the file (or its compressed stream) ends before all of its voxel data.
    """
    import gzip
    import zlib

    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"  # a .nii.gz may be stored uncompressed: look, not at the name
    empty = np.zeros(0, np.int64), np.zeros(0, np.float64)
    try:
        with (gzip.open if compressed else open)(path, "rb") as f:
            head = f.read(540)
            header = _nifti_header(head)
            if header is None:
                return empty
            order, datatype, bitpix, n_voxels, offset = header
            expected = n_voxels * bitpix // 8
            dtype = (np.dtype(_NIFTI_FLOAT_TYPES[datatype]).newbyteorder(order)
                     if datatype in _NIFTI_FLOAT_TYPES else None)
            if len(head) < offset:  # skip header extensions
                f.read(offset - len(head))
            size = dtype.itemsize if dtype is not None else 1
            carry, got, index, values = head[offset:], 0, [], []
            while got < expected:
                more = f.read(chunk)
                buf = carry + more
                usable = min(len(buf) - len(buf) % size, expected - got)
                if dtype is not None and usable:
                    block = np.frombuffer(buf[:usable], dtype=dtype)
                    bad = np.flatnonzero(~np.isfinite(block))
                    if bad.size:
                        index.append(bad + got // size)
                        values.append(block[bad].astype(np.float64))
                got, carry = got + usable, buf[usable:]
                if not more:
                    break
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise InputError(f"{path}: corrupt or truncated file ({err})") from None
    if got < expected:
        raise InputError(f"{path}: truncated file: {got} of its {expected} bytes of voxel data are there")
    if not index:
        return empty
    return np.concatenate(index), np.concatenate(values)


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return head[128:132] == b"DICM"
    except OSError:
        return False


def _short_itk_message(exc: Exception) -> str:
    """The informative last line of an ITK exception, without the C++ file/line noise."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("itk::ERROR") or "Description:" in line:
            msg = line.split("Description:", 1)[-1].split("):", 1)[-1].strip()
            return msg[:200]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def read_mask(
    path: str | os.PathLike,
    *,
    reference: Volume | None = None,
    reference_name: str | os.PathLike | None = None,
    label: int | None = None,
    binary: bool = False,
    allow_empty: bool = False,
    tol: float = 1e-3,
) -> Volume:
    """Read a segmentation (label map or binary mask) and check it.

    Arguments:
      path: mask file (any format :func:`read_volume` takes).
      reference (Volume | None): the image the mask belongs to; its geometry (shape, spacing, origin,
        direction) must match within ``tol`` (mm for spacing/origin, unitless for direction cosines).
      reference_name: the reference's file name, used in the error message.
      label (int | None): keep only this label (returns a binary uint8 mask of it).
      binary (bool): require a binary mask (values in {0, 1}).
      allow_empty (bool): accept a mask with no foreground (rejected by default).

    Returns:
      Volume: uint8 array (D, H, W); a label map, or a {0, 1} mask when ``label`` is given.

    Raises:
      InputError: the mask is unreadable, not a label map (negative or fractional values), not binary
        when asked, empty, lacks ``label``, or does not match the reference geometry.
    """
    mask = read_volume(path)
    if reference is not None:
        check_same_geometry(reference, mask, reference_name or "the image", path, tol=tol)
    if label is not None:
        return mask.with_array(mask_channels(mask, path, [label])[0])
    if not mask.is_label_map:
        raise InputError(f"{path}: not a segmentation: values must be non-negative integers")
    labels = mask.labels()
    if binary and any(v != 1 for v in labels):
        raise InputError(
            f"{path}: mask is not binary (labels {', '.join(map(str, labels))}); choose one with a label option"
        )
    if not labels and not allow_empty:
        raise InputError(f"{path}: mask is empty (no foreground voxel)")
    if max(labels, default=0) > 255:
        return mask.with_array(mask.array.astype(np.int32))
    return mask.with_array(mask.array.astype(np.uint8))


def mask_channels(mask: Volume, name: str | os.PathLike, labels: list[int] | None = None) -> list[np.ndarray]:
    """Check a segmentation and split it into one binary array per requested label.

    Arguments:
      mask (Volume): a label map (D, H, W).
      name: how to name the mask in error messages (usually its path).
      labels (list[int] | None): the labels to extract; None requires a binary mask (a single foreground
        value, e.g. 1 or 255) and returns it as one channel.

    Returns:
      list[np.ndarray]: one uint8 {0, 1} array (D, H, W) per label (one when ``labels`` is None).

    Raises:
      InputError: not a label map, empty, not binary without ``labels``, or a requested label absent.
    """
    if not mask.is_label_map:
        raise InputError(f"{name}: not a segmentation: values must be non-negative integers")
    found = mask.labels()
    if not found:
        raise InputError(f"{name}: mask is empty (no foreground voxel)")
    if labels is None:
        if len(found) > 1:
            raise InputError(
                f"{name}: mask is not binary (labels {', '.join(map(str, found))}); "
                "choose the structure(s) with a label option (--label)"
            )
        return [(mask.array != 0).astype(np.uint8)]
    missing = [label for label in labels if label not in found]
    if missing:
        raise InputError(
            f"{name}: mask has no voxel with label {missing[0]} (labels found: {', '.join(map(str, found))})"
        )
    return [(mask.array == label).astype(np.uint8) for label in labels]


# ---------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------
def write_volume(volume: Volume, path: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write ``volume`` to ``path``, the format chosen by the extension, atomically.

    Arguments:
      volume (Volume): array (D, H, W) and geometry to write.
      path: destination ending in ``.nii.gz``, ``.nii``, ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd``; parent
        folders are created. ``.mhd``/``.nhdr`` also write their data file beside the header.
      compress (bool): compress the voxel data where the format allows it.

    Returns:
      Path: the written path. On failure nothing is left at ``path`` (the data go to a temporary file in
      the same folder first and are moved into place when complete).
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if not suffix:
        raise InputError(f"{path}: unsupported output type (use one of {', '.join(SUFFIXES)})")
    path.parent.mkdir(parents=True, exist_ok=True)
    image = volume.to_sitk()
    tmpdir = Path(tempfile.mkdtemp(prefix=".irisseg-", dir=path.parent))
    try:
        tmp = tmpdir / path.name
        try:
            sitk.WriteImage(image, str(tmp), useCompression=compress and suffix != ".nii")
        except RuntimeError as exc:
            raise InputError(f"{path}: cannot write image ({_short_itk_message(exc)})") from None
        # Header + data formats leave two files; move the data file first so the header never dangles.
        for written in sorted(tmpdir.iterdir(), key=lambda p: p.name == path.name):
            os.replace(written, path.parent / written.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def write_dicom_series(volume: Volume, folder: str | os.PathLike, *, series_uid: str | None = None) -> Path:
    """Write ``volume`` as a DICOM series (one CT-like slice file per z index) into ``folder``.

    Meant for tests and for exporting; the array is stored as int16 (values are rounded and must fit).
    The direction must be a proper rotation (DICOM stores two axes and derives the third).

    Arguments:
      volume (Volume): array (D, H, W); each of the D slices becomes one file ``slice_XXXX.dcm``.
      folder: destination folder (created).
      series_uid (str | None): SeriesInstanceUID to use; a new one by default.

    Returns:
      Path: the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = np.round(np.asarray(volume.array, dtype=np.float64))
    if arr.min() < np.iinfo(np.int16).min or arr.max() > np.iinfo(np.int16).max:
        raise InputError("write_dicom_series: values do not fit in int16")
    image = volume.with_array(arr.astype(np.int16)).to_sitk()
    direction = volume.direction
    uid_root = "1.2.826.0.1.3680043.2.1125"
    stamp = f"{np.random.default_rng().integers(1, 10**12)}"
    series_uid = series_uid or f"{uid_root}.2.{stamp}"
    study_uid = f"{uid_root}.1.{stamp}"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orientation = "\\".join(f"{v:.10g}" for v in (*direction[:, 0], *direction[:, 1]))
    with _kept_locale():  # GDCM sets the C locale while writing
        for k in range(image.GetDepth()):
            sl = image[:, :, k]
            position = image.TransformIndexToPhysicalPoint((0, 0, k))
            tags = {
                "0008|0060": "CT",
                "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0008|0018": f"{series_uid}.{k + 1}",
                "0020|000d": study_uid,
                "0020|000e": series_uid,
                "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{v:.10g}" for v in position),
                "0020|0037": orientation,
                "0018|0050": f"{volume.spacing[2]:.10g}",
                "0028|0030": f"{volume.spacing[1]:.10g}\\{volume.spacing[0]:.10g}",
                "0028|1052": "0",
                "0028|1053": "1",
            }
            for tag, value in tags.items():
                sl.SetMetaData(tag, value)
            writer.SetFileName(str(folder / f"slice_{k:04d}.dcm"))
            writer.Execute(sl)
    return folder


@contextlib.contextmanager
def _kept_locale():
    """Restore the process's C locale afterwards: GDCM's DICOM writer sets it to "C", which would turn
    Python's default text encoding (``open()`` without ``encoding``) into ASCII for the rest of the process."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


# ---------------------------------------------------------------------------------------------------
# geometry checks
# ---------------------------------------------------------------------------------------------------
def _geometry_differences(a: Volume, b: Volume, tol: float) -> list[str]:
    diffs = []
    if a.shape != b.shape:
        diffs.append(f"shape {a.shape} vs {b.shape}")
    for name in ("spacing", "origin"):
        va, vb = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
        if not np.allclose(va, vb, rtol=0, atol=tol):
            fa = ", ".join(f"{v:.4g}" for v in va)
            fb = ", ".join(f"{v:.4g}" for v in vb)
            diffs.append(f"{name} ({fa}) vs ({fb})")
    if not np.allclose(a.direction, b.direction, rtol=0, atol=tol):
        diffs.append(f"direction {orientation_code(a)} vs {orientation_code(b)}")
    return diffs


def same_geometry(a: Volume, b: Volume, tol: float = 1e-3) -> bool:
    """Whether two volumes share shape, spacing, origin and direction.

    Arguments:
      a, b (Volume): the volumes to compare.
      tol (float): absolute tolerance, in mm for spacing and origin and unitless for direction cosines
        (files written in float32, such as NIfTI, round positions to about 1e-5 mm).

    Returns:
      bool: True when shapes are equal and every spacing, origin and direction entry agrees within ``tol``.
    """
    return not _geometry_differences(a, b, tol)


def check_same_geometry(
    a: Volume, b: Volume, a_name: str | os.PathLike, b_name: str | os.PathLike, tol: float = 1e-3
) -> None:
    """Raise :class:`InputError` naming both files and what differs when ``a`` and ``b`` do not match.

    Arguments:
      a, b (Volume): e.g. an image and its mask.
      a_name, b_name: how to name them in the message (usually their paths).
      tol (float): as in :func:`same_geometry`.
    """
    diffs = _geometry_differences(a, b, tol)
    if diffs:
        raise InputError(f"{b_name}: geometry does not match {a_name}: " + "; ".join(diffs))


def orientation_code(volume: Volume) -> str:
    """Three-letter orientation code of the array axes, e.g. ``"LPS"`` (ITK/DICOM convention).

    The letters say where each image axis (x, y, z) points: L(eft), P(osterior), S(uperior) or their
    opposites. An oblique direction gets the code of the closest axis-aligned orientation.
    """
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(tuple(volume.direction.reshape(-1)))


def check_output_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path, if a file may be written there (it may exist as a file, to be replaced).

    Raises:
      InputError: ``path`` is an existing folder.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name to write to")
    return path


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str] | tuple[str, ...] | None = None,
              float_digits: int | None = None) -> Path:
    """Write table rows as CSV atomically (a temporary file, then a rename), creating parent folders.

    Arguments:
      path: the CSV file. rows: one dict per row. columns: column order (default: the first row's keys);
        a key missing from a row is written empty.
      float_digits: significant digits of float cells (None: Python's repr).

    Returns:
      Path: ``path``.
    """
    import csv

    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns if columns is not None else (rows[0] if rows else []))
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.{float_digits}g}" if float_digits and isinstance(r.get(k), float) else r.get(k, ""))
                        for k in columns})
    tmp.replace(path)
    return path
