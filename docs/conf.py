"""Sphinx configuration for the drizzle3d documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html``. The figures and the
configuration reference are generated at build time from the package itself
(``docs/figures.py`` and ``docs/gen_config.py``), so they always show the code
that is installed.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import drizzle3d  # noqa: E402

project = "drizzle3d"
author = "drizzle3d developers"
copyright = "2025, drizzle3d developers"
release = drizzle3d.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
]

# numpydoc: parameters from docstrings, class members listed by autodoc (not a second table)
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": False}

templates_path = []
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
html_theme = "alabaster"
html_theme_options = {
    "description": "3-D drizzle for SPHEREx spectral images",
    "fixed_sidebar": True,
}
html_static_path = []
html_title = f"drizzle3d {release}"


def _generate(app):
    """Write the figures and the configuration reference into docs/_generated/."""
    import figures
    import gen_config

    out = HERE / "_generated"
    out.mkdir(exist_ok=True)
    gen_config.write(out / "config_reference.rst")
    gen_config.write_cli(out / "cli_reference.rst")
    figures.make_all(out)


def setup(app):
    app.connect("builder-inited", _generate)
    return {"parallel_read_safe": True}
