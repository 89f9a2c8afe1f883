"""Which slices of a segment the user drew, and which the engine filled.

Why: after one Propagate every slice of the segment holds voxels; taking all of them as
the support would make every slice "painted" and a correction would fill nothing. So the
Logic remembers, per segment, the axis, the user's slices and a checksum of every slice it
wrote. At the next Propagate a slice whose content no longer matches its checksum was
edited by the user (painted or erased) and joins the user slices; the engine refills the
rest. The record is a segment tag, so it is saved with the .seg.nrrd and undone with the
segment (vtkSegmentationHistory copies tags).

Tag values are serialized by Slicer as ``key:value|key:value`` in the NRRD header: the
value uses letters, digits, ``;``, ``,``, ``x`` and ``.`` only.
"""
from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

TAG = "FewShotSeg.UserSlices"
VERSION = "v1"


@dataclass
class SliceRecord:
    """What the Logic wrote into one segment the last time."""

    axis: int                      # numpy axis of the volume array (k, j, i order)
    shape: tuple                   # volume array shape
    grid: str                      # fingerprint of the volume's voxel grid
    user: list = field(default_factory=list)      # slice indices the user drew (or erased)
    written: list = field(default_factory=list)   # crc32 of each slice as written

    def encode(self) -> str:
        users = ",".join(str(int(i)) for i in sorted(set(self.user))) or "none"
        crcs = "".join(f"{int(c) & 0xFFFFFFFF:08x}" for c in self.written)
        return ";".join([VERSION, f"a{self.axis}", "s" + "x".join(str(int(n)) for n in self.shape),
                         f"g{self.grid}", f"u{users}", f"c{crcs}"])

    @classmethod
    def decode(cls, text: str) -> Optional["SliceRecord"]:
        """None for anything that is not a record of this version (never raises)."""
        try:
            parts = text.split(";")
            if len(parts) != 6 or parts[0] != VERSION:
                return None
            axis = int(parts[1][1:])
            shape = tuple(int(n) for n in parts[2][1:].split("x"))
            grid = parts[3][1:]
            users = [] if parts[4][1:] == "none" else [int(i) for i in parts[4][1:].split(",")]
            crcs = parts[5][1:]
            written = [int(crcs[i:i + 8], 16) for i in range(0, len(crcs), 8)]
            if len(shape) != 3 or not 0 <= axis < 3 or len(written) != shape[axis]:
                return None
            if any(not 0 <= i < shape[axis] for i in users):
                return None
            return cls(axis, shape, grid, users, written)
        except (ValueError, IndexError):
            return None


def sliceChecksums(mask: np.ndarray, axis: int) -> list[int]:
    """crc32 of each slice of a bool mask along ``axis`` (bits packed: fast for 512x512x300)."""
    moved = np.moveaxis(np.asarray(mask, bool), axis, 0)
    packed = np.packbits(moved.reshape(moved.shape[0], -1), axis=1)
    return [zlib.crc32(row.tobytes()) for row in packed]


def nonEmptySlices(mask: np.ndarray, axis: int) -> list[int]:
    """Slices along ``axis`` holding voxels (no copy of the mask: fast on a 512x512x300 CT)."""
    others = tuple(a for a in range(3) if a != axis)
    return [int(i) for i in np.flatnonzero(np.asarray(mask, bool).any(axis=others))]


def gridFingerprint(volumeNode) -> str:
    """Dimensions and IJK-to-RAS matrix of the volume: stable across save and reload (node
    IDs may not be), different for another volume or a resampled one."""
    from FewShotSegSlicerLib.geometry import ijkToRasArray

    dims = volumeNode.GetImageData().GetDimensions()
    text = repr(tuple(dims)) + repr(np.round(ijkToRasArray(volumeNode), 4).tolist())
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def read(segmentationNode, segmentId) -> Optional[SliceRecord]:
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None:
        return None
    value = ""
    try:
        import vtk

        holder = vtk.reference("")
        if segment.GetTag(TAG, holder):
            value = str(holder)
    except (AttributeError, TypeError):
        value = ""
    return SliceRecord.decode(value) if value else None


def write(segmentationNode, segmentId, record: Optional[SliceRecord]) -> None:
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None:
        return
    if record is None:
        segment.RemoveTag(TAG)
    else:
        segment.SetTag(TAG, record.encode())


@dataclass
class UserSlices:
    """The outcome of comparing a segment with its record."""

    axis: int
    user: list           # sorted slice indices the user drew or erased
    edited: list         # of those, the ones changed since the last run
    fresh: bool          # True: no usable record (first run, other volume, or started over)


def classify(current: np.ndarray, record: Optional[SliceRecord], axis: int, grid: str) -> UserSlices:
    """User slices of ``current`` (bool, volume array order) along ``axis``.

    Without a usable record (none, another grid or shape, another axis asked for) every
    slice holding voxels is a user slice. With one, the recorded user slices plus every
    slice whose content differs from what was written. If no engine-filled slice survives
    unchanged with voxels in it (the user cleared the segment and painted anew), the
    record is dropped: the user started over.
    """
    painted = nonEmptySlices(current, axis)
    if (record is None or record.grid != grid or tuple(record.shape) != tuple(current.shape)
            or record.axis != axis):
        return UserSlices(axis, painted, [], True)
    now = sliceChecksums(current, axis)
    edited = [i for i, (a, b) in enumerate(zip(now, record.written)) if a != b]
    user = sorted(set(record.user) | set(edited))
    engineKept = [i for i in painted if i not in set(user)]
    if not engineKept:
        return UserSlices(axis, painted, edited, True)
    return UserSlices(axis, user, edited, False)


def supportAndExclude(current: np.ndarray, axis: int, user: list) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """support = the segment on the user slices; exclude = the user slices erased to empty
    (the structure ends there: the engine's walks stop before them). The background of a
    user slice that still holds voxels needs no exclusion: the engine returns such an
    anchor exactly as drawn. None when no user slice is empty (nothing sent for nothing)."""
    current = np.asarray(current, bool)
    userMask = np.zeros(current.shape[axis], bool)
    userMask[list(user)] = True
    shape = [1, 1, 1]
    shape[axis] = -1
    support = current & userMask.reshape(shape)
    empty = [i for i in user if i not in set(nonEmptySlices(support, axis))]
    if not empty:
        return support, None
    endMask = np.zeros(current.shape[axis], bool)
    endMask[empty] = True
    return support, np.broadcast_to(endMask.reshape(shape), current.shape).copy()


__all__ = ["TAG", "SliceRecord", "UserSlices", "classify", "gridFingerprint", "nonEmptySlices",
           "read", "sliceChecksums", "supportAndExclude", "write"]
