"""3D Gaussian Splatting PLY files: the layout splat viewers and the 3DGS tool chain open.

One ``vertex`` element, binary little-endian float32 properties in this order: ``x y z``, ``nx ny nz``
(written as zeros), ``f_dc_0..2`` (SH DC colour), ``f_rest_*`` (higher SH bands, channel-major:
``f_rest_{c·K + k}`` is coefficient k of channel c, K = (degree+1)² − 1; none at degree 0),
``opacity`` (logit), ``scale_0..2`` (log), ``rot_0..3`` (raw quaternion w, x, y, z).
Values are stored before activation, so a save → load round trip is bit-exact.

Reading accepts any PLY whose vertex element carries those properties (in any order, any numeric
type, either binary byte order, extra properties ignored), as long as every element before the
vertex element has a fixed size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from .atomic import atomic_path

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_FORMATS = {"binary_little_endian": "<", "binary_big_endian": ">"}
_MAX_HEADER_LINES = 10_000
_BASE = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
         "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


@dataclass
class GaussianPLY:
    """Raw (pre-activation) Gaussian parameters, float32, as stored in the file."""

    means: Tensor  # [N,3]
    f_dc: Tensor  # [N,3] SH DC coefficient per channel
    f_rest: Tensor  # [N,K,3] higher SH coefficients, K = (sh_degree+1)² − 1
    opacity: Tensor  # [N] logit
    scale: Tensor  # [N,3] log
    rotation: Tensor  # [N,4] quaternion w, x, y, z (not normalised)

    @property
    def num_points(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        return math.isqrt(self.f_rest.shape[1] + 1) - 1


def is_gaussian_ply(path: Path) -> bool:
    """Whether ``path`` is a PLY whose header declares 3D Gaussian properties (else: a mesh file)."""
    if Path(path).suffix.lower() != ".ply":
        return False
    with open(path, "rb") as f:
        header = f.read(4096).split(b"end_header")[0]
    return all(f"property float {name}".encode() in header for name in ("opacity", "scale_0", "rot_0"))


def _property_names(num_rest: int) -> list[str]:
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
            + [f"f_rest_{i}" for i in range(num_rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def write_gaussian_ply(path: Path, gaussians: GaussianPLY) -> None:
    """Write ``gaussians`` to ``path`` (temporary name in the same folder, renamed when complete)."""
    n = gaussians.num_points
    rest = gaussians.f_rest.detach().reshape(n, -1, 3).transpose(1, 2).reshape(n, -1)
    columns = [
        gaussians.means.reshape(n, 3),
        torch.zeros(n, 3),
        gaussians.f_dc.reshape(n, 3),
        rest,
        gaussians.opacity.reshape(n, 1),
        gaussians.scale.reshape(n, 3),
        gaussians.rotation.reshape(n, 4),
    ]
    table = torch.cat([c.detach().to("cpu", torch.float32) for c in columns], dim=1).numpy()
    names = _property_names(rest.shape[1])
    records = np.empty(n, dtype=[(name, "<f4") for name in names])
    for i, name in enumerate(names):
        records[name] = table[:, i]
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}"]
    header += [f"property float {name}" for name in names]
    header.append("end_header")
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(records.tobytes())


@dataclass
class _Element:
    name: str
    count: int
    properties: list[tuple[str, str]]  # (name, numpy type code); type "list" marks a list property


def _parse_header(f, path: Path) -> tuple[str, list[_Element]]:
    if f.readline(16).rstrip(b"\r\n") != b"ply":
        raise UserError(f"not a PLY file: {path}")
    byte_order = None
    elements: list[_Element] = []
    for _ in range(_MAX_HEADER_LINES):
        raw = f.readline(4096)
        if not raw:
            break
        words = raw.decode("ascii", errors="replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            if byte_order is None:
                raise UserError(f"PLY header without a format line: {path}")
            return byte_order, elements
        if words[0] == "format" and len(words) >= 2:
            if words[1] not in _FORMATS:
                raise UserError(f"unsupported PLY format '{words[1]}' (binary only): {path}")
            byte_order = _FORMATS[words[1]]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append(_Element(words[1], int(words[2]), []))
        elif words[0] == "property" and elements and len(words) == 3 and words[1] in _PLY_TYPES:
            elements[-1].properties.append((words[2], _PLY_TYPES[words[1]]))
        elif words[0] == "property" and elements and len(words) == 5 and words[1] == "list":
            elements[-1].properties.append((words[4], "list"))
        else:
            raise UserError(f"malformed PLY header line '{raw.decode('ascii', 'replace').strip()}': {path}")
    raise UserError(f"PLY header has no end_header line: {path}")


def read_gaussian_ply(path: Path) -> GaussianPLY:
    """Read a 3DGS PLY; a missing file, a non-PLY, a truncated file or a PLY without the Gaussian
    properties (e.g. a mesh) raises ``UserError`` with one line saying which."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Gaussian PLY not found: {path}")
    with open(path, "rb") as f:
        byte_order, elements = _parse_header(f, path)
        offset = 0
        for element in elements:
            if any(kind == "list" for _, kind in element.properties):
                raise UserError(f"PLY element '{element.name}' has list properties where 3DGS files have "
                                f"none (not a 3DGS file): {path}")
            dtype = np.dtype([(name, byte_order + kind) for name, kind in element.properties])
            if element.name == "vertex":
                break
            offset += element.count * dtype.itemsize
        else:
            raise UserError(f"PLY has no vertex element (not a 3DGS file): {path}")
        names = {name for name, _ in element.properties}
        missing = [name for name in _BASE if name not in names]
        if missing:
            raise UserError(f"PLY lacks the 3D Gaussian properties {', '.join(missing)} "
                            f"(a mesh or point cloud, not a 3DGS file): {path}")
        num_rest = sum(1 for name in names if name.startswith("f_rest_"))
        rest_names = [f"f_rest_{i}" for i in range(num_rest)]
        k = num_rest // 3
        if num_rest % 3 or math.isqrt(k + 1) ** 2 != k + 1 or any(n not in names for n in rest_names):
            raise UserError(f"PLY has {num_rest} f_rest properties, not a full SH band set: {path}")
        f.seek(offset, 1)
        data = f.read(element.count * dtype.itemsize)
    if len(data) < element.count * dtype.itemsize:
        raise UserError(f"PLY file is truncated ({len(data)} of {element.count * dtype.itemsize} "
                        f"vertex bytes): {path}")
    records = np.frombuffer(data, dtype=dtype, count=element.count)

    n = element.count

    def column(*cols: str) -> Tensor:
        stacked = np.zeros((n, len(cols)), np.float32)
        for i, c in enumerate(cols):
            stacked[:, i] = records[c]
        return torch.from_numpy(stacked)

    return GaussianPLY(
        means=column("x", "y", "z"),
        f_dc=column("f_dc_0", "f_dc_1", "f_dc_2"),
        f_rest=column(*rest_names).reshape(n, 3, k).transpose(1, 2).contiguous(),
        opacity=column("opacity").reshape(n),
        scale=column("scale_0", "scale_1", "scale_2"),
        rotation=column("rot_0", "rot_1", "rot_2", "rot_3"),
    )
