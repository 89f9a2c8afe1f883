"""Reading, aligning and writing volumes and label maps.

* `read_image` reads a NIfTI / NRRD / MetaImage file or a DICOM series folder and
  returns a 3D scalar `SimpleITK.Image` (float32, or an unsigned integer label map with
  ``label=True``). Truncated NIfTI files, 2D / 4D / vector images and non-finite voxels
  are refused with a one-line `FewShotSegError`.
* `read_mask_like` reads a label map and puts it on the grid of a reference image
  (nearest neighbour, in physical space), so a mask stored with another origin or a
  flipped axis still lands on the right voxels.
* `write_image` writes atomically (temporary file next to the target, then
  `os.replace`) and refuses to overwrite an input.
* `array_axis_for` maps 'axial' / 'coronal' / 'sagittal' to the numpy axis of
  `sitk.GetArrayFromImage` (order k, j, i) closest to S-I / A-P / L-R.

Arrays are always in SimpleITK order (k, j, i); SimpleITK sizes and spacings are (x, y, z).
"""
from __future__ import annotations

import contextlib
import gzip
import itertools
import os
import signal
import struct
import tempfile
import threading
import zlib
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np
import SimpleITK as sitk

from .errors import FewShotSegError

PathLike = Union[str, os.PathLike]

#: file name endings `write_image` accepts (checked longest first)
WRITE_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
#: anatomical slicing axes
AXES = ("axial", "coronal", "sagittal")
#: physical axis (LPS: 0 = x L-R, 1 = y A-P, 2 = z S-I) each anatomical axis runs along
AXIS_PHYSICAL = {"sagittal": 0, "coronal": 1, "axial": 2}

# grid comparison tolerances of `same_grid`
_SPACING_RTOL = 1e-4
_DIRECTION_ATOL = 1e-4
_ORIGIN_FRACTION = 1e-3  # of the smallest spacing

_CHUNK_VOXELS = 1 << 24  # 16 M voxels per chunk when scanning large arrays


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once: mkstemp makes 0600 files, outputs get the usual mode


# ----------------------------------------------------------------------------- reading
def read_image(path: PathLike, label: bool = False) -> sitk.Image:
    """Read a 3D scalar image from a file or a DICOM series folder.

    ``label=False`` (default): intensities as float32. ``label=True``: an unsigned integer
    label map (UInt8 when the largest value fits, else UInt16/UInt32); float label files
    must hold whole, non-negative numbers. A DICOM folder with several series gives the
    first one in GDCM's order.
    """
    path = Path(path)
    if not path.exists():
        raise FewShotSegError(f"{'label' if label else 'image'} file {path} not found")
    kind = "label map" if label else "image"      # what the messages call it
    image = _read_dicom_folder(path) if path.is_dir() else _read_file(path, kind)
    image = _as_3d_scalar(image, path, kind)
    for key in image.GetMetaDataKeys():  # format-specific keys only cause writer warnings
        image.EraseMetaData(key)
    bad = _count_nonfinite(image)
    if bad:
        raise FewShotSegError(f"{kind} {path} contains {bad} non-finite voxels (NaN or inf)")
    return _to_label_image(image, path) if label else _to_float32(image)


def _read_file(path: Path, kind: str = "image") -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise FewShotSegError(f"cannot read {path}: not a NIfTI, NRRD, MetaImage or DICOM image, "
                              "or the file is corrupt") from None
    if reader.HasMetaDataKey("0020|000e"):  # a DICOM file (it has a Series Instance UID)
        series = _dicom_series_of(path)
        if series is not None:  # one file of a series: read the whole series
            return series
    # refuse 2D / 4D / vector images before loading the voxels
    _check_3d_scalar(reader.GetDimension(), list(reader.GetSize()), reader.GetNumberOfComponents(), path, kind)
    nonfinite = _check_nifti(path) if _is_nifti(path) else 0
    if nonfinite:
        raise FewShotSegError(f"{kind} {path} contains {nonfinite} non-finite voxels (NaN or inf)")
    try:
        return reader.Execute()
    except RuntimeError:
        raise FewShotSegError(f"cannot read {path}: the file is truncated or corrupt") from None


def _dicom_series_of(path: Path) -> Optional[sitk.Image]:
    """The series a single DICOM file belongs to, when its folder holds more of it."""
    folder = path.resolve().parent
    try:
        for series_id in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id)
            if len(files) > 1 and any(Path(f).resolve() == path.resolve() for f in files):
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames(files)
                return reader.Execute()
    except RuntimeError:
        raise FewShotSegError(f"cannot read the DICOM series of {path}: a file is corrupt or the "
                              "slices do not form one volume") from None
    return None


def _read_dicom_folder(path: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    try:
        series = reader.GetGDCMSeriesIDs(str(path))
    except RuntimeError:
        series = ()
    if not series:
        raise FewShotSegError(f"folder {path} holds no DICOM series")
    files = reader.GetGDCMSeriesFileNames(str(path), series[0])
    if not files:
        raise FewShotSegError(f"folder {path} holds no readable DICOM series")
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError:
        raise FewShotSegError(f"cannot read the DICOM series in {path}: a file is corrupt or the "
                              "slices do not form one volume") from None


def _check_3d_scalar(dim: int, size: list, components: int, path, kind: str = "image") -> None:
    if components != 1:
        raise FewShotSegError(f"{kind} {path} has {components} values per voxel (vector/colour image); "
                              "a 3D scalar volume is needed")
    if dim == 4 and size[3] == 1:
        return  # one time point: a 3D volume
    if dim != 3:
        raise FewShotSegError(f"{kind} {path} is {dim}D (size {tuple(size)}); a 3D scalar volume is needed")


def _as_3d_scalar(image: sitk.Image, path, kind: str = "image") -> sitk.Image:
    size = list(image.GetSize())
    _check_3d_scalar(image.GetDimension(), size, image.GetNumberOfComponentsPerPixel(), path, kind)
    if image.GetDimension() == 4:  # a 4D file with a single time point is a 3D volume
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    return image


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of real floating-point voxels


def _nifti_layout(header: bytes) -> Optional[dict]:
    """Byte order, datatype, data offset and voxel count of a single-file NIfTI-1/2 header."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            datatype, bitpix = struct.unpack(order + "hh", header[70:74])
            dims = struct.unpack(order + "8h", header[40:56])
            offset = max(int(struct.unpack(order + "f", header[108:112])[0]), 352)
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            datatype, bitpix = struct.unpack(order + "hh", header[12:16])
            dims = struct.unpack(order + "8q", header[16:80])
            offset = max(int(struct.unpack(order + "q", header[168:176])[0]), 544)
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    count = int(np.prod([max(int(d), 1) for d in dims[1:ndim + 1]], dtype=np.int64))
    return {"order": order, "datatype": datatype, "offset": offset, "count": count,
            "end": offset + count * bitpix // 8}


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _check_nifti(path: Path) -> int:
    """Completeness of a NIfTI file, and its number of non-finite voxels.

    ITK reads a truncated NIfTI without complaint (zeros for the missing part) and turns
    NaN / inf voxels into 0, so both are checked on the file itself: float files are
    streamed once; integer files get a size check (the gzip trailer's length, with full
    decompression only when that does not match).
    """
    truncated = FewShotSegError(f"cannot read {path}: the file is truncated or corrupt")
    gz = path.name.lower().endswith(".gz")
    try:
        with _open_maybe_gz(path) as f:
            layout = _nifti_layout(f.read(540))
        if layout is None:
            return 0
        end = layout["end"]
        float_code = _NIFTI_FLOAT_TYPES.get(layout["datatype"])
        if float_code is not None:
            dtype = np.dtype(layout["order"] + float_code)
            bad = 0
            block = (1 << 24) // dtype.itemsize * dtype.itemsize
            with _open_maybe_gz(path) as f:
                skip = layout["offset"]
                while skip > 0:
                    got = len(f.read(min(skip, 1 << 20)))
                    if not got:
                        raise truncated
                    skip -= got
                remaining = end - layout["offset"]
                while remaining > 0:
                    data = f.read(min(block, remaining))
                    if not data:
                        break
                    usable = len(data) // dtype.itemsize * dtype.itemsize
                    bad += int(np.count_nonzero(~np.isfinite(np.frombuffer(data[:usable], dtype))))
                    remaining -= len(data)
            if remaining > 0:
                raise truncated
            return bad
        if not gz:
            if os.path.getsize(path) < end:
                raise truncated
            return 0
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = struct.unpack("<I", f.read(4))[0]
        if isize == end % (1 << 32):
            return 0  # the gzip trailer holds the expected length: complete (cheap check)
        # no match (truncated, or several gzip members): decompress everything to be sure
        total = 0
        with gzip.open(path, "rb") as f:
            while True:
                data = f.read(1 << 24)
                if not data:
                    break
                total += len(data)
        if total < end:
            raise truncated
        return 0
    except (OSError, EOFError, zlib.error, struct.error):
        raise truncated from None


def _count_nonfinite(image: sitk.Image) -> int:
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return 0
    flat = sitk.GetArrayViewFromImage(image).reshape(-1)
    return int(sum(int(np.count_nonzero(~np.isfinite(flat[s:s + _CHUNK_VOXELS])))
                   for s in range(0, flat.size, _CHUNK_VOXELS)))


def _to_float32(image: sitk.Image) -> sitk.Image:
    if image.GetPixelID() == sitk.sitkFloat32:
        return image
    return sitk.Cast(image, sitk.sitkFloat32)


def _label_pixel_type(max_value: float) -> int:
    if max_value <= 255:
        return sitk.sitkUInt8
    if max_value <= 65535:
        return sitk.sitkUInt16
    return sitk.sitkUInt32


def _to_label_image(image: sitk.Image, path) -> sitk.Image:
    arr = sitk.GetArrayViewFromImage(image)
    if arr.size == 0:
        return sitk.Cast(image, sitk.sitkUInt8)
    low, high = float(arr.min()), float(arr.max())
    if low < 0:
        raise FewShotSegError(f"label map {path} has negative values (minimum {low:g})")
    if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
        raise FewShotSegError(f"label map {path} holds fractional values; a label map needs whole numbers")
    if high > np.iinfo(np.uint32).max:
        raise FewShotSegError(f"label map {path} has values beyond 2^32")
    target = _label_pixel_type(high)
    return image if image.GetPixelID() == target else sitk.Cast(image, target)


# ----------------------------------------------------------------------------- geometry
def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Same size, and spacing / origin / direction equal within a small tolerance."""
    if a.GetDimension() != b.GetDimension() or a.GetSize() != b.GetSize():
        return False
    sa, sb = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if not np.allclose(sa, sb, rtol=_SPACING_RTOL, atol=0):
        return False
    if not np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=_DIRECTION_ATOL):
        return False
    tol = _ORIGIN_FRACTION * float(min(sa.min(), sb.min()))
    return bool(np.all(np.abs(np.array(a.GetOrigin()) - np.array(b.GetOrigin())) <= tol))


def read_mask_like(path: Union[PathLike, sitk.Image], reference: sitk.Image, what: str = "support mask") -> sitk.Image:
    """A label map on the grid of ``reference`` (UInt8 / UInt16 / UInt32).

    ``path`` is a label file / DICOM folder, or an already loaded `sitk.Image`. When its
    grid differs from the reference's it is resampled there with nearest neighbour in
    physical space (identity transform), so flipped axes and other origins are handled.
    A mask with labelled voxels none of which fall inside the reference is an error;
    ``what`` names the mask in messages.
    """
    if isinstance(path, sitk.Image):
        name = what
        mask = _to_label_image(_as_3d_scalar(path, name), name)
    else:
        name = f"{what} {path}"
        mask = read_image(path, label=True)
    if reference.GetDimension() != 3:
        raise FewShotSegError(f"the reference image is {reference.GetDimension()}D; a 3D volume is needed")
    if same_grid(mask, reference):
        if mask.GetOrigin() != reference.GetOrigin() or mask.GetSpacing() != reference.GetSpacing() \
                or mask.GetDirection() != reference.GetDirection():
            mask = sitk.Image(mask)
            mask.CopyInformation(reference)  # absorb float noise in the header
        return mask
    had_voxels = bool(np.any(sitk.GetArrayViewFromImage(mask)))
    resampled = sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                              mask.GetPixelID())
    if had_voxels and not np.any(sitk.GetArrayViewFromImage(resampled)):
        raise FewShotSegError(f"{name} does not overlap the image (no labelled voxel falls inside it "
                              "in physical space)")
    return resampled


def array_axis_for(image: sitk.Image, axis: str) -> int:
    """The numpy axis (0, 1, 2 of ``GetArrayFromImage`` order k, j, i) closest to the
    physical S-I ('axial'), A-P ('coronal') or L-R ('sagittal') direction.

    The three index axes are matched to the three physical axes as a whole (the
    permutation with the largest total alignment), so flipped, permuted and oblique
    directions always give three distinct answers.
    """
    key = str(axis).strip().lower()
    if key not in AXIS_PHYSICAL:
        raise FewShotSegError(f"unknown axis '{axis}'; choose axial, coronal or sagittal")
    if image.GetDimension() != 3:
        raise FewShotSegError(f"a 3D image is needed to choose the {key} axis "
                              f"(this one is {image.GetDimension()}D)")
    direction = np.abs(np.array(image.GetDirection(), dtype=float).reshape(3, 3))
    # direction[p, d]: component along physical axis p of index axis d (d = 0 is i / x)
    best = max(itertools.permutations(range(3)),
               key=lambda perm: sum(direction[p, perm[p]] for p in range(3)))
    index_axis = best[AXIS_PHYSICAL[key]]  # sitk index axis (i, j, k) = (0, 1, 2)
    return 2 - index_axis


# ----------------------------------------------------------------------------- labels
def _label_counts(arr: np.ndarray) -> dict:
    """{value: voxel count} of the non-zero values of an integer / bool / whole-float array."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        n = int(np.count_nonzero(arr))
        return {1: n} if n else {}
    if arr.size == 0:
        return {}
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise FewShotSegError("support mask holds fractional values; a label map needs whole numbers")
    low, high = arr.min(), arr.max()
    if low < 0:
        raise FewShotSegError(f"support mask has negative values (minimum {low})")
    if high == 0:
        return {}
    flat = arr.reshape(-1)
    if high <= 65535:
        counts = np.zeros(int(high) + 1, np.int64)
        step = 1 << 22  # bincount works on an int64 copy: 32 MB at a time
        for s in range(0, flat.size, step):
            part = flat[s:s + step]
            if part.dtype.kind == "f" or part.dtype.itemsize > 4:
                part = part.astype(np.int64)
            counts += np.bincount(part, minlength=int(high) + 1)
        return {int(v): int(counts[v]) for v in np.flatnonzero(counts) if v != 0}
    values, counts = np.unique(flat[flat != 0], return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def labels_present(mask_array: np.ndarray) -> list[int]:
    """The label values of a painting, in increasing order (a bool mask holds label 1)."""
    return sorted(_label_counts(mask_array))


def select_label(mask_array: np.ndarray, label: Optional[int] = None) -> np.ndarray:
    """The voxels of one label as a bool array.

    ``label=None`` takes the only label present; several labels without a choice, an
    absent label or an empty mask are errors.
    """
    arr = np.asarray(mask_array)
    if label is not None:
        if isinstance(label, bool) or int(label) != label or label <= 0:
            raise FewShotSegError(f"label {label} is not valid; labels are positive whole numbers")
        label = int(label)
    counts = _label_counts(arr)
    if not counts:
        raise FewShotSegError("support mask is empty: paint the structure on at least one slice")
    present = ", ".join(str(v) for v in sorted(counts))
    if label is None:
        if len(counts) > 1:
            raise FewShotSegError(f"support mask holds several labels ({present}); choose one with --label, "
                                  "or propagate them all together")
        label = next(iter(counts))
    elif label not in counts:
        raise FewShotSegError(f"label {label} is not in the support mask (labels present: {present})")
    if arr.dtype == bool:
        return arr.copy()
    return arr == label


def label_image_like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A label image (UInt8; UInt16 when values exceed 255) with the geometry of ``reference``."""
    arr = np.asarray(array)
    expected = tuple(reversed(reference.GetSize()))
    if arr.shape != expected:
        raise FewShotSegError(f"label array shape {arr.shape} differs from the image {expected}")
    if arr.dtype != bool and arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise FewShotSegError("label values must lie in 0..65535")
    dtype = np.uint16 if arr.dtype != bool and arr.size and arr.max() > 255 else np.uint8
    image = sitk.GetImageFromArray(arr.astype(dtype, copy=False))
    image.CopyInformation(reference)
    return image


# ----------------------------------------------------------------------------- writing
def _extension(path: Path) -> Optional[str]:
    name = path.name.lower()
    for ext in WRITE_EXTENSIONS:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    return None


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _segmentation_metadata(image: sitk.Image) -> sitk.Image:
    """Segment fields so 3D Slicer opens a ``.seg.nrrd`` label map as a segmentation."""
    if image.GetPixelID() not in (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32, sitk.sitkInt8,
                                  sitk.sitkInt16, sitk.sitkInt32):
        return image
    try:
        values = sorted(_label_counts(sitk.GetArrayViewFromImage(image)))
    except FewShotSegError:
        return image
    tagged = sitk.Image(image)
    tagged.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    tagged.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    for n, value in enumerate(values):
        tagged.SetMetaData(f"Segment{n}_ID", f"Segment_{value}")
        tagged.SetMetaData(f"Segment{n}_Name", f"Segment_{value}")
        tagged.SetMetaData(f"Segment{n}_LabelValue", str(value))
        tagged.SetMetaData(f"Segment{n}_Layer", "0")
    return tagged


def check_outputs(paths: Iterable[PathLike], inputs: Iterable[PathLike] = ()) -> None:
    """Refuse, before any work, output paths that `write_images` would refuse after it: an
    unknown extension, a folder, an input, the same file twice, a folder that cannot be
    written or created. Why: a bad ``-o`` found after minutes of propagation wastes them."""
    paths = [Path(p) for p in paths if p is not None and str(p) != ""]
    inputs = [Path(p) for p in inputs if p is not None and str(p) != ""]
    seen = []
    for path in paths:
        if _extension(path) is None:
            raise FewShotSegError(f"cannot write {path}: use one of the extensions "
                                  f"{', '.join(sorted(WRITE_EXTENSIONS))}")
        if any(_same_file(path, inp) for inp in inputs):
            raise FewShotSegError(f"output path {path} is also an input; choose another file name")
        if any(_same_file(path, other) for other in seen):
            raise FewShotSegError(f"{path} is named for two outputs; give each output its own file")
        seen.append(path)
        if path.is_dir():
            raise FewShotSegError(f"cannot write {path}: it is a folder")
        probe = path.parent.resolve()
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise FewShotSegError(f"cannot write {path}: {probe} is a file, not a folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise FewShotSegError(f"cannot write {path}: Permission denied")


def check_nifti_geometry(image: sitk.Image, paths: Iterable[PathLike]) -> None:
    """Refuse NIfTI outputs for an image whose axes are not perpendicular (a CT with gantry
    tilt read from NRRD or MetaImage): NIfTI cannot hold such a direction, ITK coerces it
    to another one and the mask lands elsewhere in the patient."""
    nifti = [Path(p) for p in paths if p is not None and str(p) != "" and _is_nifti(Path(p))]
    direction = np.asarray(image.GetDirection(), float).reshape(image.GetDimension(), -1)
    if nifti and not np.allclose(direction.T @ direction, np.eye(direction.shape[0]), atol=1e-4):
        raise FewShotSegError(f"cannot write {nifti[0]}: the image's axes are not perpendicular (sheared, e.g. a "
                              "gantry tilt), which NIfTI cannot store; write .nrrd or .mha instead")


def write_images(items: Iterable[tuple], *, inputs: Iterable[PathLike] = (), written: Optional[list] = None) -> list[Path]:
    """Write several (image, path) pairs all or nothing: each goes to a temporary file next
    to its target first; only when every one is written are they moved into place, with
    Ctrl-C and SIGTERM held back for those moments. On failure nothing is left behind and
    existing files stay as they were. ``written``: each path is appended once in place (a
    Ctrl-C held back until the end still knows that the files were written)."""
    items = [(image, Path(path)) for image, path in items]
    inputs = list(inputs)
    check_outputs([path for _, path in items], inputs)
    for image, path in items:
        check_nifti_geometry(image, [path])
    staged = []
    try:
        for image, path in items:
            staged.append((_stage(image, path), path))
        with _signals_held():
            for tmp, path in staged:
                os.replace(tmp, path)
                if written is not None:
                    written.append(path)
            staged = []
    except OSError as exc:
        raise FewShotSegError(f"cannot write {path}: {exc.strerror or 'the move failed'}") from None
    finally:
        for tmp, _ in staged:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return [path for _, path in items]


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block ends (POSIX main thread; elsewhere nothing)."""
    held = {signal.SIGINT, signal.SIGTERM}
    blocking = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if blocking:
        signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        if blocking:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


def _stage(image: sitk.Image, path: Path) -> str:
    """``image`` written to a new temporary file beside ``path`` (the folder created if
    needed); its name. On failure nothing is left, not even a folder made here."""
    ext = _extension(path)
    parent = path.parent
    created = []
    probe = parent.resolve()
    while not probe.exists():
        created.append(probe)  # innermost first
        probe = probe.parent
    tmp, done = None, False
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + path.name[:-len(ext)] + ".", suffix=ext, dir=parent)
        os.close(fd)
        out = _segmentation_metadata(image) if ext == ".seg.nrrd" else image
        sitk.WriteImage(out, tmp, useCompression=ext != ".nii")
        os.chmod(tmp, 0o666 & ~_UMASK)
        done = True
        return tmp
    except (OSError, RuntimeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "the writer failed"
        raise FewShotSegError(f"cannot write {path}: {reason}") from None
    finally:
        if not done:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break


def write_image(image: sitk.Image, path: PathLike, *, inputs: Iterable[PathLike] = ()) -> Path:
    """Write ``image`` to ``path`` atomically and return the path.

    The image goes to a temporary file with the same extension in the target folder and is
    moved into place with `os.replace`; on failure nothing is left behind (not even a
    folder this call created) and an existing file stays as it was. Refuses a path that
    resolves to one of ``inputs``. Extensions: .nii.gz, .nii, .nrrd, .seg.nrrd, .mha.
    """
    return write_images([(image, path)], inputs=inputs)[0]
