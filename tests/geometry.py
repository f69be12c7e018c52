"""Test helpers: compare volumes whose index orders differ (flips, axis permutations, offsets)."""
from __future__ import annotations

import numpy as np

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: (k, j, i, 1) -> (i, j, k, 1): a NIfTI/ITK index order reversed to numpy's.
REVERSE_INDEX = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def index_map(affine_b: np.ndarray, affine_a: np.ndarray, atol: float = 1e-3) -> np.ndarray:
    """``M = inv(affine_b) @ affine_a``: a's voxel index -> b's voxel index.

    Raises AssertionError unless ``M`` is a signed permutation with integer translation
    (within ``atol`` voxels), i.e. the two grids are the same up to flips/transposes/offsets.
    """
    m = np.linalg.inv(np.asarray(affine_b, float)) @ np.asarray(affine_a, float)
    r = np.rint(m)
    if not np.allclose(m, r, atol=atol):
        raise AssertionError(f"the two grids are not related by a signed permutation:\n{np.round(m, 6)}")
    rot = r[:3, :3]
    if not (np.all(np.abs(rot).sum(0) == 1) and np.all(np.abs(rot).sum(1) == 1)):
        raise AssertionError(f"not a signed permutation:\n{rot}")
    return r


def align_to(array_b: np.ndarray, affine_b: np.ndarray, affine_a: np.ndarray,
             shape_a: tuple[int, ...] | None = None, atol: float = 1e-3) -> np.ndarray:
    """``array_b`` (3-D, on grid ``affine_b``) re-indexed exactly into a's index order.

    Both affines map their array's voxel index to the same world space. Returns ``out`` with
    ``out[idx_a] == array_b[M @ idx_a]`` (``M`` from :func:`index_map`), cropped to
    ``shape_a`` when given, else as far as b's grid reaches. Raises AssertionError when the
    grids are not related by a signed permutation plus integer offset, or a starts outside b.
    """
    m = index_map(affine_b, affine_a, atol)
    rot, off = m[:3, :3].astype(int), m[:3, 3].astype(int)
    src_axis = [int(np.flatnonzero(rot[:, p])[0]) for p in range(3)]  # b's axis feeding a's axis p
    out = np.transpose(np.asarray(array_b), src_axis)
    index = []
    for p, q in enumerate(src_axis):
        sign, start = int(rot[q, p]), int(off[q])
        if not 0 <= start < out.shape[p]:
            raise AssertionError(f"a's axis {p} starts at b's index {start}, outside 0..{out.shape[p] - 1}")
        index.append(slice(start, None, sign))
    out = out[tuple(index)]
    if shape_a is not None:
        if any(o < s for o, s in zip(out.shape, shape_a)):
            raise AssertionError(f"b's grid does not cover a's: {out.shape} < {tuple(shape_a)}")
        out = out[tuple(slice(0, s) for s in shape_a)]
    return out


def nifti_to_lps(img) -> tuple[np.ndarray, np.ndarray]:
    """A nibabel image as (array (k, j, i), LPS affine over (k, j, i))."""
    data = np.asanyarray(img.dataobj).astype(np.float64)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return np.ascontiguousarray(data.T), RAS_TO_LPS @ img.affine @ REVERSE_INDEX
