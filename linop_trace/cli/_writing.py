"""Writing the outputs (``--output``, ``--plot``): their paths checked before anything is
computed, their files staged beside the targets and renamed into place only once the whole
run has succeeded."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from ._errors import CliError, one_line

__all__ = [
    "OUTPUT_SUFFIXES",
    "PLOT_SUFFIXES",
    "Staged",
    "check_distinct",
    "check_target",
    "write_vector",
]

OUTPUT_SUFFIXES = (".npy", ".csv")
PLOT_SUFFIXES = (".png", ".pdf", ".svg")
#: Rows of a CSV output formatted at a time (the text of all n rows is never held at once).
CSV_ROWS = 65536


def _reason(error: OSError) -> str:
    return error.strerror or one_line(error)


def _directory(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


class Staged:
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


def check_target(path: str | None, suffixes: tuple[str, ...], option: str) -> Path | None:
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


def check_distinct(source: Path, targets: Sequence[tuple[str, str | None]]) -> None:
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


def write_vector(
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
