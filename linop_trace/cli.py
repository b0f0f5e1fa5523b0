"""``linop-trace``: trace, diagonal and row sums of a matrix file, from the terminal.

Subcommands::

    linop-trace trace FILE      the trace, with its standard error and interval
    linop-trace diagonal FILE   the main diagonal (--output FILE.npy / FILE.csv)
    linop-trace rowsums FILE    the row sums A @ 1 (one matvec, exact)
    linop-trace demo            every estimator on a real problem (an MLP Hessian, a sparse matrix)
    linop-trace methods         the registered method names

Files: ``.npy``, ``.npz`` (``scipy.sparse.save_npz`` or one dense array from
``numpy.savez``) and Matrix Market ``.mtx`` / ``.mtx.gz``. Bad input (a missing,
unreadable or corrupt file, a non-square matrix, NaN entries, an unknown method, backend
or device) ends with exit status 2 and one line on stderr; ``--debug`` adds the traceback.
Before anything is computed the outputs are checked (a writable directory, not the input
file) and the size the file declares is checked against the memory available, so a tiny
file declaring a huge matrix is refused instead of exhausting the memory. Outputs are
written to temporary files beside them and renamed into place only once the whole run has
succeeded: a failed run leaves existing files as they were and no partial ones.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from . import _backend as backend
from ._estimate import Estimate
from ._functions import diagonal, row_sums, trace
from ._operators import LinearOperator, aslinearoperator
from ._probes import PROBES
from .estimators import available_methods, get_estimator

__all__ = ["CliError", "load_matrix", "main"]

PROG = "linop-trace"
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

FORMATS = (".npy", ".npz", ".mtx", ".mtx.gz")
DTYPES = ("float32", "float64", "complex64", "complex128")
OUTPUT_SUFFIXES = (".npy", ".csv")
PLOT_SUFFIXES = (".png", ".pdf", ".svg")
#: The progress bar appears only for estimates that run longer than this (seconds).
PROGRESS_DELAY = 1.0
#: Blocks the exact path is split into when a progress bar is shown.
PROGRESS_STEPS = 25
#: Below this size the plot computes the exact value even without a stored diagonal.
PLOT_EXACT_LIMIT = 4096
#: Vector entries shown on the terminal (the rest goes to --output).
SHOWN_ENTRIES = 10
DEMO_MATRIX = "digits_knn_laplacian.mtx"
#: Rows of a CSV output formatted at a time (the text of all n rows is never held at once).
CSV_ROWS = 65536
#: Most bytes deflate expands one compressed byte into (its limit is about 1032:1).
GZIP_MAX_RATIO = 1032
#: Bytes of header (banner, comments, size line) read from a Matrix Market file at most.
MTX_HEADER_LIMIT = 1 << 20
#: Bytes of one index of a sparse matrix (int64 at the sizes where memory matters).
INDEX_BYTES = 8
#: Bytes per entry of a vector printed as JSON (a Python float in a list, then its text).
JSON_ENTRY_BYTES = 64
#: The first bytes of every NumPy .npy file (``numpy.lib.format.MAGIC_PREFIX``).
NPY_MAGIC = b"\x93NUMPY"
#: Bytes of the start of a file shown when it is not the format its name says.
SHOWN_START = 16


class CliError(Exception):
    """A problem with the user's input: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (raised, not printed with the usage)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise CliError(message)


# ----------------------------------------------------------------------------- files


def _file_format(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    found = "".join(path.suffixes[-2:]) or "no suffix"
    raise CliError(f"{path}: unknown format ({found}); expected one of {', '.join(FORMATS)}")


# Shortest text of one entry in a Matrix Market file ("1 1 0" and a line break for a
# real coordinate entry, "0" and a line break for an array entry), by field.
_MTX_COORDINATE_BYTES = {"pattern": 4, "integer": 6, "real": 6, "double": 6, "complex": 8}
_MTX_ARRAY_BYTES = {"integer": 2, "real": 2, "double": 2, "complex": 4}


@dataclasses.dataclass(frozen=True)
class _Declared:
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


def _entries(count: int) -> str:
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def _declared(path: Path) -> _Declared | None:
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
        kind = _file_format(path)
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
                    f"{declared.describe()}, {_format_bytes(declared.stored * dtype.itemsize)}, "
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


def _dense(shape: tuple[int, ...], dtype: np.dtype[Any]) -> _Declared | None:
    if len(shape) != 2 or dtype.hasobject:
        return None  # the reader refuses these with its own message
    rows, cols = shape
    return _Declared(rows, cols, rows * cols, rows * cols, dtype, sparse=False)


def _declared_npz(path: Path) -> _Declared | None:
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
            return _Declared(rows, cols, stored, stored, data_header[1], sparse=True)
        if len(headers) == 1:
            header = next(iter(headers.values()))
            return None if header is None else _dense(*header)
    return None


def _declared_mtx(path: Path, kind: str) -> _Declared | None:
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
        return _Declared(rows, cols, entries, rows * cols, dtype, sparse=False)
    stored = entries if symmetry == "general" else 2 * entries
    return _Declared(rows, cols, entries, stored, dtype, sparse=True)


def _reading_bytes(declared: _Declared) -> int:
    """Memory that reading the file takes at its peak: a sparse file is parsed into COO (two
    indices and a value per entry), converted to CSR (row pointers, one index and a value per
    entry) and checked for finite values (a mask); a dense one is its array and the mask."""
    stored, item = declared.stored, declared.dtype.itemsize
    if not declared.sparse:
        return stored * (item + 1)
    coo = stored * (2 * INDEX_BYTES + item)
    return coo + _csr_bytes(declared.rows, stored, item) + stored


def _csr_bytes(rows: int, stored: int, item: int) -> int:
    return (rows + 1) * INDEX_BYTES + stored * (INDEX_BYTES + item)


def _format_bytes(count: float) -> str:
    units = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB")
    unit = 0
    while count >= 1024 and unit < len(units) - 1:
        count, unit = count / 1024, unit + 1
    return f"{int(count)} bytes" if unit == 0 else f"{count:.4g} {units[unit]}"


def _cgroup_memory_left() -> int | None:
    """Bytes left under the memory limits of this process's cgroup and those above it (a
    container's limit: cgroup v2 or v1), counting reclaimable page cache as free; ``None``
    where no limit is set or none can be read."""
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    left = []
    for line in lines:
        number, controllers, own = (line.split(":", 2) + ["", ""])[:3]
        if number == "0" and not controllers:  # v2: one hierarchy
            base, names = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1: the memory controller's hierarchy
            base = root / "memory"
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        folder = base / own.strip().lstrip("/")
        for directory in (folder, *folder.parents):
            if not directory.is_relative_to(base):
                break
            figure = _cgroup_left(directory, *names)
            if figure is not None:
                left.append(figure)
    return min(left) if left else None


def _cgroup_left(directory: Path, limit_name: str, usage_name: str, cache_key: str) -> int | None:
    try:
        text = (directory / limit_name).read_text().strip()
        if text == "max":
            return None
        limit, usage = int(text), int((directory / usage_name).read_text().strip())
    except (OSError, ValueError):
        return None
    if limit >= 1 << 60:  # v1 writes "no limit" as a huge number
        return None
    cache = 0
    with contextlib.suppress(OSError, ValueError):
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == cache_key:
                cache = int(value)
    return max(0, limit - usage + cache)


def _address_space_left() -> int | None:
    """Bytes of address space left under ``ulimit -v`` (RLIMIT_AS); ``None`` without one."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft == resource.RLIM_INFINITY or soft < 0:
            return None
    except (ImportError, OSError, ValueError):
        return None
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmSize:"):
                    return max(0, soft - int(line.split()[1]) * 1024)
    return int(soft)


def _available_memory() -> int | None:
    """Bytes this process may still allocate: the host's available memory, or less where a
    container's cgroup limit or an address-space limit leaves less; ``None`` if unknown."""
    known = [
        figure
        for figure in (backend.host_free_memory(), _cgroup_memory_left(), _address_space_left())
        if figure is not None
    ]
    return min(known) if known else None


def _check_memory(path: Path, declared: _Declared, need: int) -> None:
    """Refuse (CliError) a run that would need more memory than is available."""
    available = _available_memory()
    if available is not None and need > available:
        raise CliError(
            f"{path}: the file declares {declared.describe()}; this run would need about "
            f"{_format_bytes(need)} of memory and {_format_bytes(available)} is available"
        )


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
    kind = _file_format(path)
    declared = _declared(path)
    if declared is not None:
        _check_memory(path, declared, _reading_bytes(declared))
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

    with np.load(path, allow_pickle=False) as archive:
        names = list(archive.files)
        if "format" in names and "shape" in names:
            return sp.load_npz(path)
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


def _default_dtype(matrix: Any) -> str:
    dtype = np.dtype(matrix.dtype)
    if dtype.kind in "fc" and dtype.name in DTYPES:
        return dtype.name
    if dtype.kind == "c":
        return "complex128"
    return "float64"  # integer, bool, float16: the estimates need a float


def _to_library(matrix: Any, library: str, device: str | None, dtype: str) -> Any:
    """The matrix in ``library`` on ``device`` as ``dtype`` (the backend does the moving)."""
    import scipy.sparse as sp

    try:
        resolved = backend.resolve_device(library, device)
    except ImportError as error:
        raise CliError(str(error)) from None
    if dtype in ("float64", "complex128"):
        backend.enable_float64(library)
    if sp.issparse(matrix):
        return backend.sparse_from_scipy(matrix, library, resolved, dtype)
    return backend.from_numpy(matrix, library, resolved, dtype)


# ---------------------------------------------------------------------------- output


def _reason(error: OSError) -> str:
    return error.strerror or _one_line(error)


class _Staged:
    """Output files written to temporaries beside their targets and renamed into place
    together by :meth:`commit`, once the whole run has succeeded; :meth:`discard` removes
    the temporaries not committed and leaves the targets as they were.

    Errors name the user's path (``--output FILE: ...``), never a temporary."""

    def __init__(self) -> None:
        self._files: list[tuple[str, Path, str]] = []  # (temporary, target, option)

    @contextlib.contextmanager
    def open(self, path: Path, option: str = "output") -> Iterator[IO[bytes]]:
        """A binary file that becomes ``path`` on :meth:`commit`."""
        try:
            fd, temporary = tempfile.mkstemp(
                dir=_directory(path), prefix=f".{path.name}.", suffix=".part"
            )
        except OSError as error:
            raise CliError(f"{option} {path}: cannot create the file ({_reason(error)})") from None
        self._files.append((temporary, path, option))
        try:
            with os.fdopen(fd, "wb") as handle:
                yield handle
        except OSError as error:
            raise CliError(f"{option} {path}: cannot write the file ({_reason(error)})") from None

    def commit(self) -> None:
        umask = os.umask(0)
        os.umask(umask)
        for temporary, path, option in self._files:
            try:
                os.chmod(temporary, 0o666 & ~umask)
            except OSError as error:
                raise CliError(
                    f"{option} {path}: cannot write the file ({_reason(error)})"
                ) from None
        while self._files:  # renames within one directory: they do not fail once created
            temporary, path, option = self._files[0]
            try:
                os.replace(temporary, path)
            except OSError as error:
                raise CliError(
                    f"{option} {path}: cannot replace the file ({_reason(error)})"
                ) from None
            self._files.pop(0)

    def discard(self) -> None:
        for temporary, _, _ in self._files:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        self._files.clear()


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A binary file that appears at ``path`` only when the block finishes without error."""
    staged = _Staged()
    try:
        with staged.open(path) as handle:
            yield handle
        staged.commit()
    finally:
        staged.discard()


def _directory(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _check_target(path: str | None, suffixes: tuple[str, ...], option: str) -> Path | None:
    """``path`` as a Path once its format is known and its directory takes a new file
    (checked before anything is computed); CliError naming ``path`` otherwise."""
    if path is None:
        return None
    target = Path(path)
    if target.suffix.lower() not in suffixes:
        raise CliError(
            f"{option} {path}: unknown format ({target.suffix or 'no suffix'}); "
            f"expected {' or '.join(suffixes)}"
        )
    parent = _directory(target)
    if not parent.exists():
        raise CliError(f"{option} {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise CliError(f"{option} {path}: {parent} is not a directory")
    if target.is_dir():
        raise CliError(f"{option} {path}: is a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"{option} {path}: directory {parent} is not writable")
    # os.access says yes to root everywhere, and a read-only mount may refuse only the
    # creation itself: create (and remove) a file there now rather than after the run
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.", suffix=".part")
    except OSError as error:
        raise CliError(
            f"{option} {path}: cannot create a file in {parent} ({_reason(error)})"
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        pass
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):
        return a.absolute() == b.absolute()


def _check_distinct(source: Path, targets: Sequence[tuple[str, str | None]]) -> None:
    """Refuse outputs that are the input file (by any path: a symlink, a hard link, ``..``)
    or one another."""
    seen: list[tuple[str, str]] = []
    for option, path in targets:
        if path is None:
            continue
        if _same_file(Path(path), source):
            raise CliError(
                f"{option} {path}: that is the input file {source}; refusing to overwrite it"
            )
        for other_option, other in seen:
            if _same_file(Path(path), Path(other)):
                raise CliError(f"{option} {path}: the same file as {other_option} {other}")
        seen.append((option, path))


def _write_vector(
    handle: IO[bytes], path: Path, value: np.ndarray, stderr: Any, interval: Any
) -> None:
    """``value`` (with its stderr and interval in a CSV) to ``handle``, in the format of
    ``path``; the CSV is formatted CSV_ROWS rows at a time."""
    if path.suffix.lower() == ".npy":
        np.save(handle, value)
        return
    columns: dict[str, Any] = {}
    if np.iscomplexobj(value):
        columns["value_real"], columns["value_imag"] = value.real, value.imag
    else:
        columns["value"] = value
    if stderr is not None:
        columns["stderr"] = stderr
    if interval is not None:
        columns["low"], columns["high"] = interval
    handle.write((",".join(["index", *columns]) + "\n").encode())
    for start in range(0, value.shape[0], CSV_ROWS):
        stop = min(start + CSV_ROWS, value.shape[0])
        chunk = [
            np.asarray(column[start:stop], dtype=float).tolist() for column in columns.values()
        ]
        lines = [
            ",".join([str(index), *map(repr, row)])
            for index, row in zip(range(start, stop), zip(*chunk))
        ]
        handle.write(("\n".join(lines) + "\n").encode())


def _plain(x: Any) -> Any:
    """A NumPy scalar/array as JSON-ready Python (complex as {"real", "imag"})."""
    if x is None:
        return None
    a = np.asarray(x)
    if np.iscomplexobj(a):
        return {"real": _plain(a.real), "imag": _plain(a.imag)}
    if a.ndim == 0:
        value = float(a)
        return value if math.isfinite(value) else None
    return [v if math.isfinite(v) else None for v in a.astype(float).tolist()]


def _format_number(x: Any, digits: int = 10) -> str:
    value = complex(x) if np.iscomplexobj(np.asarray(x)) else float(x)
    if isinstance(value, complex):
        return f"{value.real:.{digits}g}{value.imag:+.{digits}g}j"
    return f"{value:.{digits}g}"


# ------------------------------------------------------------------------- progress


class _ProgressOperator(LinearOperator):
    """The user's operator, reporting each block of columns to a progress bar."""

    def __init__(self, inner: LinearOperator, update: Callable[[int], Any]) -> None:
        super().__init__(inner.shape, inner.dtype, inner.xp, inner.device, inner.tags)
        self.inner = inner
        self.update = update
        self.columns = 0

    def _count(self, out: Any, columns: int) -> Any:
        self.columns += columns
        self.update(columns)
        return out

    def _matmat(self, X: Any) -> Any:
        return self._count(self.inner.matmat(X), int(X.shape[1]))

    def _rmatmat(self, X: Any) -> Any:
        return self._count(self.inner.rmatmat(X), int(X.shape[1]))

    def to_dense(self, block_size: int | None = None) -> Any:
        return self.inner.to_dense(block_size)

    def _exact_diagonal(self) -> Any:
        return self.inner._exact_diagonal()


def _progress_wanted(quiet: bool, stream: Any = None) -> bool:
    stream = sys.stderr if stream is None else stream
    if quiet:
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def _progress(
    operator: LinearOperator, total: int, enabled: bool, label: str, stream: Any = None
) -> Iterator[LinearOperator]:
    """``operator`` wrapped so that a tqdm bar (after PROGRESS_DELAY seconds) counts matvecs."""
    if not enabled:
        yield operator
        return
    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a nicety: without tqdm, run without one
        yield operator
        return
    bar = tqdm(
        total=total,
        desc=label,
        unit="matvec",
        file=sys.stderr if stream is None else stream,
        delay=PROGRESS_DELAY,
        leave=False,
        dynamic_ncols=True,
    )
    try:
        yield _ProgressOperator(operator, bar.update)
    finally:
        bar.close()


# ----------------------------------------------------------------------- estimation


def _exact_block_for_progress(n: int) -> int:
    """Identity columns per block on the exact path when a progress bar is shown.

    The default block may hold all n columns, so the bar would jump from 0 to n at the
    end; about PROGRESS_STEPS blocks let it move. Only the exact path is split this way:
    there the blocks do not change the result, while for randomized methods the block
    widths set the order of the random draws, and a terminal must not change a seeded
    estimate.
    """
    return max(1, math.ceil(n / PROGRESS_STEPS))


#: Methods whose interrupted runs give a partial estimate (Hutchinson's, and ``auto`` when
#: it runs Hutchinson): on Ctrl-C the CLI waits for the block in progress for them.
PARTIAL_METHODS = ("hutchinson", "auto")
#: How often (seconds) the main thread looks at the computing thread.
_POLL = 0.05


def _interruptible(compute: Callable[[], Any], keeps_partial: bool) -> Any:
    """``compute()`` in a worker thread, the main thread waiting, so that Ctrl-C is seen at
    once even while a long library call (a product, a QR factorization) runs: Python
    handles a signal only between its own steps, in the main thread.

    On Ctrl-C, a method with partial estimates gets a ``KeyboardInterrupt`` raised in the
    worker at its next Python step, which comes when the block in progress is done, and
    its ``EstimateInterrupted`` (with the partial estimate) is raised here; a second
    Ctrl-C stops waiting. Other methods have nothing partial to give: the interrupt is
    raised here at once, and the worker (a daemon thread) ends with the process.
    """
    import threading

    outcome: dict[str, Any] = {}
    # an Event, not Thread.join: a join interrupted by Ctrl-C can report a running thread
    # as finished (CPython before 3.13)
    done = threading.Event()

    def work() -> None:
        try:
            outcome["value"] = compute()
        except BaseException as error:  # handed to the main thread
            outcome["error"] = error
        finally:
            done.set()

    worker = threading.Thread(target=work, name="linop-trace-estimate", daemon=True)
    worker.start()
    try:
        while not done.wait(_POLL):
            pass
    except KeyboardInterrupt:
        if not keeps_partial or worker.ident is None:
            raise
        _raise_in_thread(worker.ident, KeyboardInterrupt)
        while not done.wait(_POLL):  # a second Ctrl-C propagates from here
            pass
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _raise_in_thread(ident: int, exception: type[BaseException]) -> None:
    """Raise ``exception`` in the thread ``ident`` at its next Python step (CPython)."""
    import ctypes

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exception))


def _estimate_options(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {
        "method": args.method,
        "num_matvecs": args.matvecs,
        "seed": seed,
        "probe": args.probe,
        "rtol": args.rtol,
        "atol": args.atol,
        "confidence": args.confidence,
        "max_matvecs": args.max_matvecs,
        "block_size": args.block_size,
    }


def _budget(options: dict[str, Any]) -> int:
    if options["rtol"] is not None or options["atol"] is not None:
        return options["max_matvecs"] or max(options["num_matvecs"] or 0, 1000)
    return options["num_matvecs"] or 100


def _walks_identity(operator: LinearOperator, options: dict[str, Any]) -> bool:
    """Whether the estimate is exact by products with identity columns (no stored diagonal)."""
    exact = options["method"] == "exact" or (
        options["method"] == "auto" and operator.shape[1] <= _budget(options)
    )
    return exact and operator._exact_diagonal() is None


def _expected_matvecs(operator: LinearOperator, options: dict[str, Any]) -> int:
    """The columns an estimate will send through the operator (the progress bar's total)."""
    if options["method"] in ("exact", "auto") and operator._exact_diagonal() is not None:
        return 0  # read from the stored diagonal
    if _walks_identity(operator, options):
        return operator.shape[1]
    return _budget(options)


def _interval(estimate: Estimate, confidence: float) -> Any:
    if estimate.stderr is None or np.iscomplexobj(backend.to_numpy(estimate.value)):
        return None
    low, high = estimate.ci(confidence)
    return backend.to_numpy(low), backend.to_numpy(high)


def _result(
    quantity: str,
    estimate: Estimate,
    seconds: float,
    confidence: float,
    extra: dict[str, Any],
) -> tuple[dict[str, Any], np.ndarray, Any, Any]:
    """The result's fields, with the value, stderr and interval as NumPy (the fields hold
    None until :func:`_json_result`: n Python floats per vector only for JSON)."""
    value = backend.to_numpy(estimate.value)
    stderr = None if estimate.stderr is None else backend.to_numpy(estimate.stderr)
    interval = _interval(estimate, confidence)
    result = {
        "quantity": quantity,
        **extra,
        "method": estimate.method,
        "value": None,
        "stderr": None,
        "interval": None,
        "confidence": confidence,
        "matvecs": int(estimate.num_matvecs),
        "converged": estimate.converged,
        "seconds": seconds,
    }
    return result, value, stderr, interval


#: The fields of a result that hold the vector (or the scalar) itself.
VALUE_FIELDS = ("value", "stderr", "interval")


def _json_result(result: dict[str, Any], value: np.ndarray, stderr: Any, interval: Any) -> str:
    if result.get("output"):  # the vector is in that file: name it, not n numbers again
        return json.dumps({k: v for k, v in result.items() if k not in VALUE_FIELDS})
    plain = interval if interval is None else [_plain(interval[0]), _plain(interval[1])]
    return json.dumps(
        {**result, "value": _plain(value), "stderr": _plain(stderr), "interval": plain}
    )


def _no_interval_reason(value: np.ndarray) -> str | None:
    """Why a value that has a stderr shows no interval (``Estimate.ci`` refuses complex
    values: their stderr is of the modulus of the error, not of each part)."""
    if not np.iscomplexobj(value):
        return None
    what = "value" if value.ndim == 0 else "values"
    return f"none for complex {what}: stderr is of the modulus |error|, not of each part"


#: Estimation options a result read from the stored diagonal leaves unused: (attribute, flag).
EXACT_UNUSED = (
    ("matvecs", "--matvecs"),
    ("max_matvecs", "--max-matvecs"),
    ("rtol", "--rtol"),
    ("atol", "--atol"),
    ("seed", "--seed"),
    ("probe", "--probe"),
    ("block_size", "--block-size"),
)


def _stored_diagonal_note(args: argparse.Namespace, estimate: Estimate) -> str | None:
    """A note naming the estimation options given that an exact result read from the
    stored diagonal (0 matvecs: ``auto`` or ``exact`` on a file) did not use."""
    if estimate.method != "exact" or estimate.num_matvecs != 0:
        return None
    unused = [flag for name, flag in EXACT_UNUSED if getattr(args, name, None) is not None]
    if not unused:
        return None
    return f"exact: the stored diagonal was read ({', '.join(unused)} unused)"


def _print_result(result: dict[str, Any], value: np.ndarray, stderr: Any, interval: Any) -> None:
    rows = [("file", f"{result['file']} ({result['description']})")]
    level = f"{100 * result['confidence']:g}%"
    if value.ndim == 0:
        rows.append((result["quantity"], _format_number(value)))
        rows.append(("stderr", "n/a" if stderr is None else _format_number(stderr, 4)))
        if interval is not None:
            rows.append(
                (f"{level} CI", f"[{_format_number(interval[0])}, {_format_number(interval[1])}]")
            )
    reason = None if stderr is None or interval is not None else _no_interval_reason(value)
    if reason is not None:
        rows.append((f"{level} CI", reason))
    seed = (
        ""
        if result.get("seed") is None or result["method"] == "exact"
        else f", seed {result['seed']}"
    )
    matvecs = f"{result['matvecs']} matvec{'' if result['matvecs'] == 1 else 's'}"
    rows.append(("method", f"{result['method']} ({matvecs}{seed})"))
    if result.get("note"):
        rows.append(("note", result["note"]))
    if result["converged"] is not None:
        rows.append(("converged", "yes" if result["converged"] else "no (budget spent first)"))
    rows.append(("time", f"{result['seconds']:.3g} s"))
    if result.get("output"):
        rows.append(("output", f"{result['output']} ({value.shape[0]} entries)"))
    if result.get("plot"):
        rows.append(("plot", result["plot"]))
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  {text}" for key, text in rows]
    if value.ndim == 1 and not result.get("output"):
        shown = min(SHOWN_ENTRIES, value.shape[0])
        span_name = "" if interval is None else f", {level} interval"
        lines.append(f"{result['quantity']} (entry, value{span_name}):")
        for i in range(shown):
            span = ""
            if interval is not None:
                span = (
                    f"  [{_format_number(interval[0][i], 6)}, {_format_number(interval[1][i], 6)}]"
                )
            lines.append(f"  {i:>6}  {_format_number(value[i])}{span}")
        if value.shape[0] > shown:
            lines.append(
                f"  ... {value.shape[0] - shown} more; --output FILE.npy or FILE.csv writes all"
            )
    print("\n".join(lines))


def _describe_operator(matrix: Any, operator: LinearOperator, library: str) -> str:
    import scipy.sparse as sp

    kind = f"sparse, {matrix.nnz} nonzeros" if sp.issparse(matrix) else "dense"
    rows, cols = operator.shape
    return f"{rows} x {cols} {kind}; {library} {backend.dtype_name(operator.dtype)} on {operator.device}"


def _elapsed(start: float, estimate: Estimate, operator: LinearOperator) -> float:
    """Seconds since ``start`` once the estimate is computed (JAX and CUDA run async)."""
    backend.block_until_ready(estimate.value)
    backend.synchronize(operator.device)
    return time.perf_counter() - start


def _run_bytes(declared: _Declared, args: argparse.Namespace, quantity: str, plot: bool) -> int:
    """Memory a run on the matrix ``declared`` takes at its peak (an estimate, from the
    header alone): the larger of reading the file and computing, where computing holds the
    matrix, its copy in the compute dtype, a probe block and its product (columns as the
    block size the run would use: on the host at most CPU_BLOCK_BYTES per block), the
    result vectors, their JSON text and the estimates a diagonal plot draws."""
    from ._blocks import CPU_BLOCK_BYTES

    rows, cols, stored = declared.rows, declared.cols, declared.stored
    item = declared.dtype.itemsize
    compute = np.dtype(getattr(args, "dtype", None) or _default_dtype(declared)).itemsize
    if declared.sparse:
        held = _csr_bytes(rows, stored, item) + _csr_bytes(rows, stored, compute)
    else:
        held = rows * cols * (item + compute)
    n = max(rows, cols)
    columns = 1 if quantity == "rowsums" else getattr(args, "block_size", None) or n
    block = max(1, min(columns, n, CPU_BLOCK_BYTES // max(1, n * compute)))
    work = (rows + cols) * block * compute
    vectors = 8 * n * 8  # value, stderr, interval and the estimators' running sums
    if getattr(args, "json", False) and quantity != "trace" and not getattr(args, "output", None):
        vectors += 4 * n * JSON_ENTRY_BYTES
    if plot and quantity == "diagonal":
        vectors += 36 * n * 8  # up to 12 estimates, each with its interval
    return max(_reading_bytes(declared), held + work + vectors)


def _run_quantity(args: argparse.Namespace, quantity: str) -> int:
    estimating = quantity in ("trace", "diagonal")
    if estimating:
        get_estimator(args.method, quantity)  # unknown names fail before the file is read
    output = _check_target(getattr(args, "output", None), OUTPUT_SUFFIXES, "--output")
    plot = _check_target(getattr(args, "plot", None), PLOT_SUFFIXES, "--plot")
    path = Path(args.file)
    _check_distinct(
        path, [("--output", getattr(args, "output", None)), ("--plot", getattr(args, "plot", None))]
    )
    if plot is not None:
        if args.method == "exact":  # refused with or without matplotlib
            raise CliError(
                "--plot shows a randomized estimate converging; method 'exact' has nothing to show"
            )
        _require_matplotlib()
    library = args.backend
    try:
        backend.import_library(library)
    except ImportError as error:
        raise CliError(str(error)) from None

    declared = _declared(path)
    if declared is not None:
        _check_memory(path, declared, _run_bytes(declared, args, quantity, plot is not None))
    matrix = load_matrix(path)
    rows, cols = matrix.shape
    if quantity != "rowsums" and rows != cols:
        raise CliError(f"{path}: {quantity} needs a square matrix, got shape ({rows}, {cols})")
    dtype = args.dtype or _default_dtype(matrix)
    if np.dtype(dtype).kind == "f" and np.iscomplexobj(matrix):
        raise CliError(
            f"{path}: the matrix is complex; --dtype {dtype} would drop its imaginary part"
        )
    operator = aslinearoperator(_to_library(matrix, library, args.device, dtype))
    extra: dict[str, Any] = {
        "file": str(path),
        "description": _describe_operator(matrix, operator, library),
        "n": int(cols),
        "shape": [int(rows), int(cols)],
        "backend": library,
        "device": str(operator.device),
        "dtype": backend.dtype_name(operator.dtype),
    }

    show_bar = _progress_wanted(args.quiet)
    options: dict[str, Any] = {}
    import scipy.stats  # noqa: F401 - intervals need it; a slow first import is not the estimate's time

    start = time.perf_counter()
    if estimating:
        seed = (
            args.seed
            if args.seed is not None
            else int(np.random.SeedSequence().generate_state(1)[0] >> 1)
        )
        extra["seed"] = seed
        options = _estimate_options(args, seed)
        function = trace if quantity == "trace" else diagonal
        total = _expected_matvecs(operator, options)
        if show_bar and options["block_size"] is None and _walks_identity(operator, options):
            options["block_size"] = _exact_block_for_progress(total)
        with _progress(operator, total, show_bar, quantity) as watched:
            estimate = _interruptible(
                lambda: function(watched, **options),
                keeps_partial=options["method"] in PARTIAL_METHODS,
            )
    else:
        with _progress(operator, 1, show_bar, quantity) as watched:
            estimate = row_sums(watched)
    seconds = _elapsed(start, estimate, operator)
    if estimating and estimate.method == "exact":
        extra["seed"] = None  # nothing random ran: a seed would claim otherwise

    confidence = getattr(args, "confidence", 0.95)
    result, value, stderr, interval = _result(quantity, estimate, seconds, confidence, extra)
    note = _stored_diagonal_note(args, estimate) if estimating else None
    if note is not None:
        result["note"] = note
    staged = _Staged()  # the outputs appear together, and only if all of them were written
    try:
        if output is not None:
            with staged.open(output, "--output") as handle:
                _write_vector(handle, output, value, stderr, interval)
            result["output"] = str(output)
        if plot is not None:
            _plot(plot, quantity, operator, options, estimate, str(path), staged)
            result["plot"] = str(plot)
        staged.commit()
    finally:
        staged.discard()
    if args.json:
        print(_json_result(result, value, stderr, interval))
    else:
        _print_result(result, value, stderr, interval)
    return EXIT_OK


# ----------------------------------------------------------------------------- plot


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError(
            "--plot needs matplotlib, which is not installed (pip install matplotlib, or "
            'pip install -c constraints.txt -e ".[cli]" in the checkout)'
        ) from None


def _sample_curve(estimate: Estimate, confidence: float) -> Any:
    """Running mean and Student-t interval of per-probe samples whose mean is the estimate.

    Returns ``(m, mean, low, high)`` for the first m = 2, 3, ... samples, or ``None`` when
    the estimate carries no such samples (``info["samples"]``).
    """
    samples = estimate.info.get("samples") if isinstance(estimate.info, dict) else None
    if samples is None:
        return None
    s = backend.to_numpy(samples).ravel()
    value = backend.to_numpy(estimate.value)
    if s.size < 2 or s.size != estimate.num_matvecs or np.iscomplexobj(s) or value.ndim != 0:
        return None
    if abs(s.mean() - float(value)) > 1e-8 * max(1.0, abs(float(value))):
        return None  # the samples are not what the estimate averages (e.g. a residual)
    from scipy import stats

    count = np.arange(1, s.size + 1)
    centre = s.mean()
    running = np.cumsum(s) / count
    # squared deviations from the running mean via a fixed centre (stable enough here)
    squares = np.cumsum((s - centre) ** 2) - count * (running - centre) ** 2
    count, running, squares = count[1:], running[1:], np.maximum(squares[1:], 0.0)
    stderr = np.sqrt(squares / (count - 1) / count)
    half = stats.t.ppf(0.5 + confidence / 2, count - 1) * stderr
    return count, running, running - half, running + half


def _budget_curve(
    quantity: str, operator: LinearOperator, options: dict[str, Any], estimate: Estimate
) -> tuple[list[int], list[Any], list[Any]]:
    """Estimates at geometrically growing budgets with the same seed, ending at the run's own."""
    estimator = get_estimator(options["method"], quantity)
    lowest = max(int(getattr(estimator, "min_matvecs", 1)), 2)
    final = int(estimate.num_matvecs)
    budgets = (
        sorted({int(b) for b in np.geomspace(lowest, final, 12)} - {final})
        if final > lowest
        else []
    )
    function = trace if quantity == "trace" else diagonal
    points, values, intervals = [], [], []
    fixed = {**options, "rtol": None, "atol": None, "max_matvecs": None}
    for budget in budgets:
        try:
            at_budget = function(operator, **{**fixed, "num_matvecs": budget})
            at_budget.value  # noqa: B018 - its checks run when first read (torch, JAX)
        except ValueError:
            continue  # a budget the method cannot work with
        points.append(at_budget.num_matvecs)
        values.append(backend.to_numpy(at_budget.value))
        intervals.append(_interval(at_budget, options["confidence"]))
    points.append(final)
    values.append(backend.to_numpy(estimate.value))
    intervals.append(_interval(estimate, options["confidence"]))
    return points, values, intervals


def _exact_for_plot(quantity: str, operator: LinearOperator) -> Any:
    if operator._exact_diagonal() is None and operator.shape[1] > PLOT_EXACT_LIMIT:
        return None
    function = trace if quantity == "trace" else diagonal
    return backend.to_numpy(function(operator, method="exact").value)


def _plain_log_ticks(axis: Any) -> None:
    """Budgets as 3, 10, 30 rather than 3x10^0 on a log axis."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    formatter = ScalarFormatter()
    formatter.set_scientific(False)
    axis.set_major_formatter(formatter)
    axis.set_minor_formatter(NullFormatter())


def _plot(
    path: Path,
    quantity: str,
    operator: LinearOperator,
    options: dict[str, Any],
    estimate: Estimate,
    label: str,
    staged: _Staged,
) -> None:
    # a bare Figure (no pyplot): no GUI backend, no global state in the caller's process
    from matplotlib.figure import Figure

    level = f"{100 * options['confidence']:g}%"
    figure = Figure(figsize=(7, 4.5))
    axes = figure.subplots()
    exact = None if estimate.method == "exact" else _exact_for_plot(quantity, operator)
    if quantity == "trace" and estimate.method == "exact":
        # nothing converges (auto on a stored matrix): the value as a line, not a dot at 0
        spent = (
            "read from the stored diagonal, 0 matvecs"
            if estimate.num_matvecs == 0
            else f"{estimate.num_matvecs} matvecs"
        )
        axes.axhline(
            float(np.real(backend.to_numpy(estimate.value))),
            color="k",
            label=f"exact trace = {_format_number(backend.to_numpy(estimate.value), 8)} ({spent})",
        )
        axes.set_xticks([])
        axes.set_xlabel("no estimate converging to show: the trace is exact")
        axes.set_ylabel("trace")
    elif quantity == "trace":
        curve = _sample_curve(estimate, options["confidence"])
        if curve is None:
            points, values, intervals = _budget_curve(quantity, operator, options, estimate)
            x = np.array(points)
            y = np.array([float(np.real(v)) for v in values])
            ok = [i for i, iv in enumerate(intervals) if iv is not None]
            axes.plot(x, y, "o-", label=f"{estimate.method} estimate")
            if ok:
                low = np.array([float(intervals[i][0]) for i in ok])
                high = np.array([float(intervals[i][1]) for i in ok])
                axes.fill_between(x[ok], low, high, alpha=0.25, label=f"{level} interval")
            axes.set_xscale("log")
            _plain_log_ticks(axes.xaxis)
        else:
            x, y, low, high = curve
            axes.plot(x, y, label=f"{estimate.method}: mean of the first m samples")
            axes.fill_between(x, low, high, alpha=0.25, label=f"{level} t-interval of those")
            axes.set_xscale("log")
            _plain_log_ticks(axes.xaxis)
            # the first few samples give huge intervals: frame the rest (and the truth)
            first = max(1, len(x) // 10)
            bottom, top = float(np.min(low[first:])), float(np.max(high[first:]))
            if exact is not None:
                bottom, top = (
                    min(bottom, float(np.real(exact))),
                    max(top, float(np.real(exact))),
                )
            pad = 0.1 * (top - bottom) or 1.0
            axes.set_ylim(bottom - pad, top + pad)
            interval = _interval(estimate, options["confidence"])
            if interval is not None:  # the method's own interval may use another quantile
                centre = float(estimate.value)
                axes.errorbar(
                    [x[-1]],
                    [centre],
                    yerr=[[centre - float(interval[0])], [float(interval[1]) - centre]],
                    fmt="o",
                    color="C3",
                    capsize=4,
                    label=f"reported estimate and {level} interval",
                )
        if exact is not None:
            axes.axhline(
                float(np.real(exact)),
                color="k",
                linestyle="--",
                label=f"exact = {_format_number(np.real(exact), 8)}",
            )
        axes.set_ylabel("trace")
    elif estimate.method == "exact":  # nothing converges: show the diagonal itself
        axes.plot(backend.to_numpy(estimate.value).real, ".", markersize=3, label="exact")
        axes.set_ylabel(quantity)
        axes.set_xlabel("index")
    else:
        points, values, intervals = _budget_curve(quantity, operator, options, estimate)
        reference = exact if exact is not None else values[-1]
        scale = float(np.linalg.norm(reference)) or 1.0
        curves: list[tuple[list[int], list[float], str, str]] = []
        if exact is not None:
            errors = [float(np.linalg.norm(v - exact)) / scale for v in values]
            curves.append((points, errors, "o-", "relative error ||d_est - d|| / ||d||"))
        widths = [
            (points[i], float(np.linalg.norm((iv[1] - iv[0]) / 2)) / scale)
            for i, iv in enumerate(intervals)
            if iv is not None
        ]
        if widths:
            curves.append(
                (
                    [budget for budget, _ in widths],
                    [width for _, width in widths],
                    "s--",
                    f"{level} half-width (norm, relative)",
                )
            )
        logarithmic = all(v > 0 for _, ys, _, _ in curves for v in ys)
        for xs, ys, style, text in curves:
            axes.plot(xs, ys, style, label=text)
        axes.set_xscale("log")
        _plain_log_ticks(axes.xaxis)
        if logarithmic:  # an exact estimate (zero error) has no place on a log axis
            axes.set_yscale("log")
        axes.set_ylabel("relative size")
    if estimate.method != "exact":
        axes.set_xlabel("matvecs (operator applications)")
    axes.set_title(f"{quantity} of {Path(label).name}: {estimate.method}")
    axes.legend(loc="best")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    with staged.open(path, "--plot") as handle:
        figure.savefig(handle, format=path.suffix.lower().lstrip("."))


# ----------------------------------------------------------------------------- demo


#: Libraries with automatic differentiation: those the Hessian demo runs on (torch first).
AUTODIFF_LIBRARIES = ("torch", "jax")


def _demo_sparse(args: argparse.Namespace, library: str) -> tuple[str, LinearOperator]:
    from importlib import resources

    source = resources.files("linop_trace") / "data" / DEMO_MATRIX
    with resources.as_file(source) as file:
        matrix = load_matrix(file)
    operator = aslinearoperator(_to_library(matrix, library, args.device, "float64"))
    text = (
        f"graph Laplacian of the 10-nearest-neighbour graph of scikit-learn's 1,797 digits "
        f"(bundled {DEMO_MATRIX}: {matrix.shape[0]} x {matrix.shape[1]}, {matrix.nnz} nonzeros; "
        f"{library} float64)"
    )
    return text, operator


def _demo_hessian(args: argparse.Namespace, library: str) -> tuple[str, LinearOperator]:
    """The Hessian of the digits MLP written in ``library`` (torch or JAX), its variables
    and data on ``args.device``."""
    from .autodiff import _examples, hessian  # the examples' data needs scikit-learn

    device = backend.resolve_device(library, args.device)  # ImportError: not installed

    def moved(array: Any) -> Any:
        return backend.from_numpy(backend.to_numpy(array), library, device)

    if library == "torch":
        model, loss_fn, (X, y) = _examples.digits_mlp_problem(batch_size=256, seed=0)
        operator = hessian(model.to(device), loss_fn, (moved(X), moved(y)))
    else:
        apply_fn, params, loss_fn, (X, y) = _examples.digits_mlp_jax_problem(256, seed=0)
        weights = {name: moved(value) for name, value in params.items()}
        operator = hessian(apply_fn, weights, loss_fn, (moved(X), moved(y)))
    n = operator.shape[1]
    text = (
        f"Hessian of the cross-entropy loss of a 64-20-10 MLP on 256 scikit-learn digits "
        f"({n:,} parameters; {operator.library} {backend.dtype_name(operator.dtype)})"
    )
    return text, operator


def _demo_problem(args: argparse.Namespace) -> tuple[str, LinearOperator]:
    """The problem ``--problem`` names on the library ``--backend`` names.

    ``auto`` is the torch Hessian when no backend is named (the sparse matrix if torch or
    scikit-learn is missing), else the sparse matrix, which every backend runs; a Hessian
    needs automatic differentiation, so it runs on torch (the default) or JAX only.
    """
    problem, library = args.problem, args.backend
    if problem == "hessian" and library not in (None, *AUTODIFF_LIBRARIES):
        raise CliError(
            f"demo --problem hessian cannot run on --backend {library}: a Hessian needs "
            "automatic differentiation; use --backend torch or --backend jax, or "
            "--problem sparse (every backend)"
        )
    if problem == "sparse" or (problem == "auto" and library is not None):
        return _demo_sparse(args, library or "numpy")
    library = library or AUTODIFF_LIBRARIES[0]
    try:
        return _demo_hessian(args, library)
    except ImportError as error:
        if problem == "hessian":
            raise CliError(
                f"the Hessian demo on {library} needs {library} and scikit-learn ({error})"
            ) from None
        if not args.quiet:
            print(f"({error}; using the bundled sparse matrix instead)", file=sys.stderr)
        return _demo_sparse(args, "numpy")


def _run_demo(args: argparse.Namespace) -> int:
    description, operator = _demo_problem(args)
    show_bar = _progress_wanted(args.quiet)

    start = time.perf_counter()
    block_size = args.block_size
    if show_bar and block_size is None:
        block_size = _exact_block_for_progress(operator.shape[1])
    with _progress(operator, operator.shape[1], show_bar, "exact") as watched:
        exact = trace(watched, method="exact", block_size=block_size)
    rows: list[tuple[str, Estimate | None, float, str | None]] = [
        ("exact", exact, _elapsed(start, exact, operator), None)
    ]
    exact_value = float(np.real(backend.to_numpy(exact.value)))
    skip = {"exact", "auto"}
    for name in available_methods("trace"):
        if name in skip:
            continue
        start = time.perf_counter()
        try:
            with _progress(operator, args.matvecs, show_bar, name) as watched:
                estimate = trace(
                    watched,
                    method=name,
                    num_matvecs=args.matvecs,
                    seed=args.seed,
                    block_size=args.block_size,
                )
                estimate.value  # noqa: B018 - its checks run when first read (torch, JAX)
        except (ValueError, TypeError, NotImplementedError, FloatingPointError) as error:
            rows.append((name, None, time.perf_counter() - start, str(error).splitlines()[0]))
            continue
        rows.append((name, estimate, _elapsed(start, estimate, operator), None))

    records = []
    for name, result, seconds, problem in rows:
        record: dict[str, Any] = {"method": name, "seconds": seconds}
        if result is None:
            record["error"] = problem
        else:
            estimate = result
            value = float(np.real(backend.to_numpy(estimate.value)))
            interval = _interval(estimate, args.confidence)
            record.update(
                value=value,
                stderr=_plain(
                    None if estimate.stderr is None else backend.to_numpy(estimate.stderr)
                ),
                interval=None if interval is None else [float(interval[0]), float(interval[1])],
                relative_error=abs(value - exact_value) / abs(exact_value) if exact_value else None,
                matvecs=int(estimate.num_matvecs),
                resolved=estimate.method,
            )
        records.append(record)
    if args.json:
        print(
            json.dumps(
                {
                    "problem": description,
                    "n": operator.shape[1],
                    "exact": exact_value,
                    "confidence": args.confidence,
                    "seed": args.seed,
                    "results": records,
                }
            )
        )
        return EXIT_OK
    _print_demo(description, operator, args, records)
    return EXIT_OK


def _print_demo(
    description: str,
    operator: LinearOperator,
    args: argparse.Namespace,
    records: list[dict[str, Any]],
) -> None:
    level = f"{100 * args.confidence:g}%"
    header = ("method", "estimate", f"{level} interval", "covers", "rel. error", "matvecs", "time")
    table: list[tuple[str, ...]] = []
    notes: list[str] = []
    exact = records[0]["value"]
    for record in records:
        seconds = f"{record['seconds']:.3f} s"
        if "error" in record:
            notes.append(f"[{len(notes) + 1}] {record['method']}: {record['error']}")
            table.append((record["method"], f"refused [{len(notes)}]", "", "", "", "", seconds))
            continue
        interval = record["interval"]
        if interval is None:
            span, covers = "n/a", ""
        else:
            span = f"[{interval[0]:.6g}, {interval[1]:.6g}]"
            inside = interval[0] <= exact <= interval[1]
            covers = "" if record["method"] == "exact" else "yes" if inside else "no"
        error = "0" if record["method"] == "exact" else f"{record['relative_error']:.2e}"
        table.append(
            (
                record["method"],
                f"{record['value']:.8g}",
                span,
                covers,
                error,
                str(record["matvecs"]),
                seconds,
            )
        )
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    lines = [
        f"linop-trace demo: trace of the {description}",
        f"n = {operator.shape[1]}, budget {args.matvecs} matvecs per estimator, seed {args.seed}",
        "",
        "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines.extend("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)
    if notes:
        lines.extend(["", *notes])
    print("\n".join(lines))


# -------------------------------------------------------------------------- methods


def _run_methods(args: argparse.Namespace) -> int:
    names = available_methods()
    trace_names, diagonal_names = (
        set(available_methods("trace")),
        set(available_methods("diagonal")),
    )
    if args.json:
        print(
            json.dumps(
                [
                    {"name": n, "trace": n in trace_names, "diagonal": n in diagonal_names}
                    for n in names
                ]
            )
        )
        return EXIT_OK
    width = max(len(n) for n in names)
    for n in names:
        kinds = [
            q for q, known in (("trace", trace_names), ("diagonal", diagonal_names)) if n in known
        ]
        print(f"{n:<{width}}  {', '.join(kinds)}")
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text}")
    return value


def _level(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text}")
    return value


def _add_common(
    parser: argparse.ArgumentParser,
    *,
    backend_default: str | None = "numpy",
    backend_help: str = "array library to compute in (default: %(default)s)",
) -> None:
    parser.add_argument(
        "--backend", choices=backend.LIBRARIES, default=backend_default, help=backend_help
    )
    parser.add_argument(
        "--device",
        help="device of that library: cpu, cuda, cuda:1, gpu, ... (default: its default)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or notes on stderr")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _tolerance_methods(quantity: str) -> list[str]:
    """The registered methods that estimate ``quantity`` and honour rtol/atol."""
    return [
        name
        for name in available_methods(quantity)
        if getattr(get_estimator(name, quantity), "supports_tolerance", False)
    ]


def _add_estimation(parser: argparse.ArgumentParser, quantity: str) -> None:
    parser.add_argument(
        "--method",
        default="auto",
        help="a registered method (see `linop-trace methods`; default auto)",
    )
    parser.add_argument(
        "--matvecs", type=_positive_int, help="budget of operator applications (default 100)"
    )
    parser.add_argument(
        "--max-matvecs",
        type=_positive_int,
        help="cap on the budget with --rtol/--atol (default 1000)",
    )
    # from the registry, so that a method registered by the user is listed too
    takers = ", ".join(_tolerance_methods(quantity)).replace("%", "%%") or "none"
    parser.add_argument(
        "--rtol",
        type=_non_negative_float,
        help=(
            "stop when the interval half-width <= rtol * |estimate|; the methods that take "
            f"--rtol/--atol: {takers} (others refuse them)"
        ),
    )
    parser.add_argument(
        "--atol",
        type=_non_negative_float,
        help="stop when the interval half-width <= atol (the methods listed under --rtol)",
    )
    parser.add_argument(
        "--confidence", type=_level, default=0.95, help="level of the interval (default 0.95)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="random seed (default: fresh, reported in the output; an exact result uses "
        "none and reports none: JSON null)",
    )
    parser.add_argument(
        "--probe", choices=PROBES, help="probe distribution (default: the method's own)"
    )
    parser.add_argument("--block-size", type=_positive_int, help="most columns per operator call")
    parser.add_argument(
        "--dtype", choices=DTYPES, help="compute dtype (default: the file's, integers as float64)"
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="plot the running estimate and its interval against matvecs",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``linop-trace`` (subcommands trace, diagonal, rowsums, demo, methods)."""
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description="Trace, diagonal and row sums of a matrix file, with error bars.",
        epilog="Run `linop-trace demo` to see every estimator on a real problem.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    for name, text in (
        ("trace", "the trace"),
        ("diagonal", "the main diagonal"),
        ("rowsums", "the row sums A @ 1 (exact, one matvec)"),
    ):
        sub = commands.add_parser(
            name, help=text, description=f"{text[0].upper()}{text[1:]} of a matrix file."
        )
        sub.add_argument("file", metavar="FILE", help="a .npy, .npz, .mtx or .mtx.gz file")
        _add_common(sub)
        if name == "rowsums":
            sub.add_argument(
                "--dtype",
                choices=DTYPES,
                help="compute dtype (default: the file's, integers as float64)",
            )
        else:
            _add_estimation(sub, name)
        if name != "trace":
            sub.add_argument(
                "--output",
                metavar="FILE",
                help="write the vector to FILE.npy or FILE.csv (with --json the JSON then "
                'names the file under "output" and leaves out value, stderr and interval)',
            )
        sub.set_defaults(run=lambda args, quantity=name: _run_quantity(args, quantity))

    demo = commands.add_parser(
        "demo",
        help="every estimator on a real problem",
        description=(
            "The trace of a real matrix by every registered method: the Hessian of a small MLP on "
            "scikit-learn's digits (torch or JAX), or a bundled sparse graph Laplacian (any "
            "backend). By default the Hessian on torch when torch and scikit-learn are "
            "installed, else the sparse matrix."
        ),
    )
    demo.add_argument(
        "--problem",
        choices=("auto", "hessian", "sparse"),
        default="auto",
        help=(
            "hessian: on --backend torch (default) or jax; sparse: on any backend; auto "
            "(default): the torch Hessian when torch and scikit-learn are installed and no "
            "--backend is given, else the sparse matrix"
        ),
    )
    demo.add_argument(
        "--matvecs", type=_positive_int, default=100, help="budget per estimator (default 100)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument(
        "--confidence", type=_level, default=0.95, help="level of the intervals (default 0.95)"
    )
    demo.add_argument("--block-size", type=_positive_int, help="most columns per operator call")
    _add_common(
        demo,
        backend_default=None,
        backend_help="array library to compute in (default: torch for the Hessian, numpy for "
        "the sparse matrix)",
    )
    demo.set_defaults(run=_run_demo)

    methods = commands.add_parser(
        "methods",
        help="list the registered methods",
        description="The registered method names and what each estimates.",
    )
    methods.add_argument("--json", action="store_true", help="print JSON")
    methods.add_argument("--debug", action="store_true", help="show the traceback of an error")
    methods.set_defaults(run=_run_methods, quiet=False)
    return parser


# ----------------------------------------------------------------------------- main


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _partial_summary(interrupt: BaseException) -> str:
    """What an interrupted estimate had: the partial value with its interval for a trace,
    the size of a partial diagonal (not written: its outputs are not committed)."""
    from ._estimate import EstimateInterrupted

    partial = interrupt.partial if isinstance(interrupt, EstimateInterrupted) else None
    if partial is None:
        return ""
    value = partial.value
    if getattr(value, "ndim", 0) == 0:
        low, high = partial.ci()
        return (
            f"; partial estimate from {partial.num_matvecs} products: {float(value):.8g} "
            f"+- {float(partial.stderr):.3g} (95% interval {low:.8g} to {high:.8g})"
        )
    return (
        f"; a partial {partial.method} estimate of {int(value.shape[0])} entries from "
        f"{partial.num_matvecs} products was not written"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``linop-trace`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    0 on success, 2 for bad input (one line on stderr), 1 for an internal error,
    130 when interrupted.

    Examples
    --------
    >>> from linop_trace.cli import main
    >>> main(["methods"]) == 0  # doctest: +ELLIPSIS
    auto...
    True
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_BAD_INPUT
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return int(args.run(args))
    except KeyboardInterrupt as interrupt:
        print(f"{PROG}: interrupted{_partial_summary(interrupt)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of stdout went away (`| head`): stop quietly, as other commands do
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (
        CliError,
        ValueError,
        TypeError,
        FloatingPointError,
        OSError,
        ImportError,
        NotImplementedError,
    ) as error:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:
        if debug:
            traceback.print_exc()
        print(
            f"{PROG}: internal error: {type(error).__name__}: {_one_line(error)} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
