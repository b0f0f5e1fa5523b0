"""Sphinx configuration of the linop_trace documentation (built by ``nox -s docs``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import linop_trace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # for the gallery's shared helpers, if any

os.environ.setdefault("MPLBACKEND", "Agg")
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

project = "linop_trace"
author = "linop_trace developers"
copyright = "2026, linop_trace developers"
release = linop_trace.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path: list[str] = []
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "examples/README.rst"]
root_doc = "index"

# API reference from the docstrings (numpydoc format).
autosummary_generate = True
autodoc_typehints = "none"  # numpydoc's parameter lists already state the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

intersphinx_mapping: dict[str, tuple[str, None]] = {}

sphinx_gallery_conf = {
    "examples_dirs": ["examples"],
    "gallery_dirs": ["auto_examples"],
    "filename_pattern": r"/plot_",  # every plot_*.py executes during the build
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib",),
}

html_theme = "pydata_sphinx_theme"
html_title = f"linop_trace {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
}
html_static_path = ["_static"]  # the accuracy figure and CSV (tools/make_accuracy_docs.py)

# Cross-references to names that are not documented here (other libraries) stay text.
nitpicky = False
