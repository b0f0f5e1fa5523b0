"""Reading a matrix file (``.npy``, ``.npz``, ``.mtx``, ``.mtx.gz``) into NumPy or SciPy,
after checking from its header alone that the file is sound and fits in memory."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from ._errors import CliError
from ._memory import check_memory, format_bytes

__all__ = ["FORMATS", "Declared", "csr_bytes", "declared_matrix", "load_matrix"]

FORMATS = (".npy", ".npz", ".mtx", ".mtx.gz")
#: Most bytes deflate expands one compressed byte into (its limit is about 1032:1).
GZIP_MAX_RATIO = 1032
#: Bytes of header (banner, comments, size line) read from a Matrix Market file at most.
MTX_HEADER_LIMIT = 1 << 20
#: Bytes of one index of a sparse matrix (int64 at the sizes where memory matters).
INDEX_BYTES = 8
#: The first bytes of every NumPy .npy file (``numpy.lib.format.MAGIC_PREFIX``).
NPY_MAGIC = b"\x93NUMPY"
#: What a .npz file starts with: the local file header of a zip archive (or, for an
#: archive without files, its end record).
ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
#: Bytes of the start of a file shown when it is not the format its name says.
SHOWN_START = 16

# Shortest text of one entry in a Matrix Market file ("1 1 0" and a line break for a
# real coordinate entry, "0" and a line break for an array entry), by field.
_MTX_COORDINATE_BYTES = {"pattern": 4, "integer": 6, "real": 6, "double": 6, "complex": 8}
_MTX_ARRAY_BYTES = {"integer": 2, "real": 2, "double": 2, "complex": 4}


def file_format(path: Path) -> str:
    """The format of ``path`` by its suffix (one of :data:`FORMATS`); CliError otherwise."""
    name = path.name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    found = "".join(path.suffixes[-2:]) or "no suffix"
    raise CliError(f"{path}: unknown format ({found}); expected one of {', '.join(FORMATS)}")


def _entries(count: int) -> str:
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def csr_bytes(rows: int, stored: int, item: int) -> int:
    """Bytes of a CSR matrix: row pointers, then an index and a value per stored entry."""
    return (rows + 1) * INDEX_BYTES + stored * (INDEX_BYTES + item)


@dataclasses.dataclass(frozen=True)
class Declared:
    """The matrix a file declares in its header, read without reading its entries."""

    rows: int
    cols: int
    entries: int  # entries the file declares
    stored: int  # entries the reader holds (a symmetric Matrix Market file: both triangles)
    dtype: np.dtype[Any]  # of the values as read
    sparse: bool

    def describe(self) -> str:
        kind = "sparse" if self.sparse else "dense"
        return f"a {self.rows} x {self.cols} {kind} matrix with {_entries(self.entries)}"

    def reading_bytes(self) -> int:
        """Memory that reading the file takes at its peak: a sparse file is parsed into COO
        (two indices and a value per entry), converted to CSR and checked for finite
        values (a mask); a dense one is its array and the mask."""
        stored, item = self.stored, self.dtype.itemsize
        if not self.sparse:
            return stored * (item + 1)
        coo = stored * (2 * INDEX_BYTES + item)
        return coo + csr_bytes(self.rows, stored, item) + stored


def declared_matrix(path: Path) -> Declared | None:
    """The size ``path`` declares, from its header alone; ``None`` where the header does not
    say (the reader then reports what is wrong).

    Raises
    ------
    CliError
        When the header declares more entries than the file can hold (a corrupt file).
    """
    try:
        if not path.is_file():
            return None
        kind = file_format(path)
    except (CliError, OSError):
        return None
    try:
        if kind == ".npy":
            with open(path, "rb") as file:
                header = _npy_header(file)
                if header is None:
                    return None
                shape, dtype = header
                room = path.stat().st_size - file.tell()
            declared = _dense(shape, dtype)
            if declared is not None and declared.stored * dtype.itemsize > room:
                raise CliError(
                    f"{path}: not a readable .npy file (corrupt header: it declares "
                    f"{declared.describe()}, {format_bytes(declared.stored * dtype.itemsize)}, "
                    f"but the file holds {room} bytes of data)"
                )
            return declared
        if kind == ".npz":
            return _declared_npz(path)
        return _declared_mtx(path, kind)
    except CliError:
        raise
    except Exception:  # an unreadable header: the reader reports it with its own words
        return None


def _npy_header(file: IO[bytes]) -> tuple[tuple[int, ...], np.dtype[Any]] | None:
    """The shape and dtype in the header of a .npy stream (left at the start of the data)."""
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(file)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(file)
    else:
        return None
    return tuple(int(d) for d in shape), np.dtype(dtype)


def _dense(shape: tuple[int, ...], dtype: np.dtype[Any]) -> Declared | None:
    if len(shape) != 2 or dtype.hasobject:
        return None  # the reader refuses these with its own message
    rows, cols = shape
    return Declared(rows, cols, rows * cols, rows * cols, dtype, sparse=False)


def _declared_npz(path: Path) -> Declared | None:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        members = {name.removesuffix(".npy"): name for name in archive.namelist()}
        headers = {}
        for key, name in members.items():
            with archive.open(name) as member:
                headers[key] = _npy_header(member)
        if "format" in members and "shape" in members:  # scipy.sparse.save_npz
            shape_header, data_header = headers["shape"], headers.get("data")
            if shape_header is None or data_header is None or math.prod(shape_header[0]) != 2:
                return None
            with archive.open(members["shape"]) as member:
                rows, cols = (int(d) for d in np.load(member, allow_pickle=False))
            stored = math.prod(data_header[0])
            return Declared(rows, cols, stored, stored, data_header[1], sparse=True)
        if len(headers) == 1:
            header = next(iter(headers.values()))
            return None if header is None else _dense(*header)
    return None


def _declared_mtx(path: Path, kind: str) -> Declared | None:
    import gzip

    compressed = kind == ".mtx.gz"
    opener: Callable[..., IO[bytes]] = gzip.open if compressed else open  # type: ignore[assignment]
    with opener(path, "rb") as file:
        banner = file.readline(MTX_HEADER_LIMIT)
        used = len(banner)
        words = banner.decode("latin-1").lower().split()
        if len(words) != 5 or words[:2] != ["%%matrixmarket", "matrix"]:
            return None
        layout, field, symmetry = words[2:]
        while True:
            line = file.readline(MTX_HEADER_LIMIT)
            used += len(line)
            if not line or used > MTX_HEADER_LIMIT:
                return None
            if line.strip() and not line.lstrip().startswith(b"%"):
                break
    numbers = [int(word) for word in line.split()]
    if layout == "coordinate" and len(numbers) == 3:
        rows, cols, entries = numbers
        shortest = _MTX_COORDINATE_BYTES.get(field)
    elif layout == "array" and len(numbers) == 2:
        rows, cols = numbers
        n = min(rows, cols)
        entries = {
            "general": rows * cols,
            "symmetric": n * (n + 1) // 2,
            "hermitian": n * (n + 1) // 2,
            "skew-symmetric": n * (n - 1) // 2,
        }.get(symmetry, rows * cols)
        shortest = _MTX_ARRAY_BYTES.get(field)
    else:
        return None
    if shortest is None or min(rows, cols, entries) < 0:
        return None
    size = path.stat().st_size
    room = size * GZIP_MAX_RATIO if compressed else size - used
    if entries * shortest - 1 > room:  # the last line may go without its line break
        raise CliError(
            f"{path}: not a readable {kind} file (corrupt header: it declares "
            f"{_entries(entries)} of a {rows} x {cols} matrix, more than a file of {size} bytes"
            f"{', compressed,' if compressed else ''} can hold)"
        )
    dtype = np.dtype({"complex": np.complex128, "integer": np.int64}.get(field, np.float64))
    if layout == "array":
        return Declared(rows, cols, entries, rows * cols, dtype, sparse=False)
    stored = entries if symmetry == "general" else 2 * entries
    return Declared(rows, cols, entries, stored, dtype, sparse=True)


def load_matrix(path: str | os.PathLike[str]) -> Any:
    """Read a matrix file into a NumPy array or a SciPy sparse CSR array.

    Parameters
    ----------
    path : str or path-like
        A ``.npy`` file, a ``.npz`` file written by ``scipy.sparse.save_npz`` or holding
        one dense array (``numpy.savez``), or a Matrix Market ``.mtx`` / ``.mtx.gz`` file.

    Returns
    -------
    numpy.ndarray or scipy.sparse.csr_array
        A 2-d numeric matrix; integer and bool entries are left as they are.

    Raises
    ------
    CliError
        For a missing file, an unknown format, a file that cannot be parsed, contents
        that are not a 2-d numeric matrix, a header that declares more entries than the
        file holds, or a declared size that reading would need more memory for than is
        available (checked before anything of that size is allocated). The message
        starts with the path.

    Examples
    --------
    >>> import numpy as np, pathlib, tempfile
    >>> from linop_trace.cli import load_matrix
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.npy"
    >>> np.save(path, np.eye(3))
    >>> load_matrix(path).shape
    (3, 3)
    """
    path = Path(path)
    if not path.exists():
        raise CliError(f"{path}: no such file")
    if path.is_dir():
        raise CliError(f"{path}: is a directory, not a matrix file")
    kind = file_format(path)
    declared = declared_matrix(path)
    if declared is not None:
        check_memory(path, declared.describe(), declared.reading_bytes())
    try:
        if kind == ".npy":
            _check_npy_magic(path)
            matrix = np.load(path, allow_pickle=False)
        elif kind == ".npz":
            matrix = _load_npz(path)
        else:
            import scipy.io

            matrix = scipy.io.mmread(path)
    except CliError:
        raise
    except PermissionError:
        raise CliError(f"{path}: permission denied") from None
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CliError(f"{path}: not a readable {kind} file ({reason})") from error
    return _check_matrix(path, matrix)


def _check_npy_magic(path: Path) -> None:
    """Refuse a file without the .npy magic header: ``np.load`` takes any other file for
    a pickle and would report "pickled (object) data" for a text file."""
    with open(path, "rb") as file:
        start = file.read(SHOWN_START)
    if start.startswith(NPY_MAGIC):
        return
    found = f"it starts with {start!r}" if start else "the file is empty"
    raise CliError(
        f"{path}: not a readable .npy file (not a NumPy .npy file: no magic header "
        f"{NPY_MAGIC!r}; {found})"
    )


def _load_npz(path: Path) -> Any:
    import scipy.sparse as sp

    # np.load reads the contents, not the name: a text file was "pickled (object) data",
    # a .npy file under this name an array without a context manager
    with open(path, "rb") as file:
        start = file.read(SHOWN_START)
    if not start.startswith((ZIP_MAGIC, EMPTY_ZIP_MAGIC)):
        kind = "a NumPy .npy file" if start.startswith(NPY_MAGIC) else f"it starts with {start!r}"
        found = kind if start else "the file is empty"
        raise CliError(
            f"{path}: not a readable .npz file (not a zip archive as numpy.savez and "
            f"scipy.sparse.save_npz write: no header {ZIP_MAGIC!r}; {found})"
        )
    with np.load(path, allow_pickle=False) as archive:
        names = list(archive.files)
        if "format" in names and "shape" in names:
            matrix = sp.load_npz(path)
            # load_npz trusts the file: an index out of range (a corrupt or hand-made
            # file) made the products read outside the arrays (a segmentation fault, or
            # uninitialised memory printed with exit 0); the full check refuses it
            if hasattr(matrix, "check_format"):
                matrix.check_format(full_check=True)
            return matrix
        if len(names) != 1:
            listed = ", ".join(names) if names else "none"
            raise CliError(
                f"{path}: expected one array (numpy.savez) or a sparse matrix "
                f"(scipy.sparse.save_npz), found {len(names)} arrays ({listed})"
            )
        return archive[names[0]]


def _check_matrix(path: Path, matrix: Any) -> Any:
    import scipy.sparse as sp

    if sp.issparse(matrix):
        matrix = sp.csr_array(matrix)
        values = matrix.data
    else:
        matrix = np.asarray(matrix)
        values = matrix
    if matrix.ndim != 2:
        raise CliError(f"{path}: expected a 2-d matrix, got an array of shape {matrix.shape}")
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_):
        raise CliError(f"{path}: expected numeric entries, got dtype {values.dtype}")
    if np.issubdtype(values.dtype, np.inexact):
        finite = np.isfinite(values)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise CliError(
                f"{path}: the matrix holds {bad} non-finite entr{'y' if bad == 1 else 'ies'} "
                "(NaN or inf)"
            )
    return matrix
