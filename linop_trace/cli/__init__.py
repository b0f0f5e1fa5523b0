"""``linop-trace``: trace, diagonal and row sums of a matrix file, from the terminal.

Subcommands::

    linop-trace trace FILE      the trace, with its standard error and interval
    linop-trace diagonal FILE   the main diagonal (--output FILE.npy / FILE.csv)
    linop-trace rowsums FILE    the row sums A @ 1 (one matvec, exact)
    linop-trace logdet FILE     log det A of a symmetric positive definite matrix, with its interval
    linop-trace spectrum FILE   the eigenvalue distribution (--plot FILE.png draws its density)
    linop-trace eigs FILE       the extreme eigenvalues (-k, --which) with their residual norms
    linop-trace demo            every estimator on a real problem (an MLP Hessian, a sparse matrix)
    linop-trace methods         the registered method names

Files: ``.npy``, ``.npz`` (``scipy.sparse.save_npz`` or one dense array from
``numpy.savez``) and Matrix Market ``.mtx`` / ``.mtx.gz``. Bad input (a missing,
unreadable or corrupt file, a non-square matrix, NaN entries, an unknown method, backend
or device; for logdet, spectrum and eigs a non-symmetric matrix, and for logdet an
indefinite one) ends with exit status 2 and one line on stderr; ``--debug`` adds the
traceback.
Before anything is computed the outputs are checked (a writable directory, not the input
file) and the size the file declares is checked against the memory available, so a tiny
file declaring a huge matrix is refused instead of exhausting the memory. Outputs are
written to temporary files beside them and renamed into place only once the whole run has
succeeded: a failed run leaves existing files as they were and no partial ones.

The modules, in the order a run meets them: ``_main`` (exit statuses), ``_parser``
(options), ``_commands`` (trace, diagonal, rowsums, methods), ``_spectral`` (logdet,
spectrum, eigs: a symmetric matrix) and ``_demos`` (demo),
``_reading`` and ``_memory`` (the file and whether it fits), ``_libraries`` (the matrix in
the asked-for library and device), ``_threads`` (``--threads``), ``_run`` (progress bar,
Ctrl-C), ``_report`` (text and JSON), ``_plot`` (``--plot``), ``_writing`` (output files),
``_errors`` (:class:`CliError`). They import the library; the library never imports them.
"""

from ._errors import CliError
from ._main import main
from ._parser import build_parser
from ._reading import load_matrix

__all__ = ["CliError", "build_parser", "load_matrix", "main"]
