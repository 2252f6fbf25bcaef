"""The documentation builds with warnings as errors, and every doctest in it passes."""

import doctest
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PUBLIC_MODULES = [
    "drizzle3d.archive",
    "drizzle3d.blot",
    "drizzle3d.channels",
    "drizzle3d.cli",
    "drizzle3d.config",
    "drizzle3d.grid",
    "drizzle3d.io",
    "drizzle3d.pipeline",
    "drizzle3d.pixmap",
    "drizzle3d.plotting",
    "drizzle3d.resample",
    "drizzle3d.simulate",
    "drizzle3d.spherex",
]
FIGURES = [
    "spatial_overlap.png",
    "spectral_overlap.png",
    "kernels.png",
    "pixfrac.png",
    "spectral_grids.png",
    "effective_wavelength.png",
    "simulated_field.png",
]


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    env = {**os.environ, "MPLBACKEND": "Agg"}
    # every warning goes to stderr; the build test requires it to be empty (sphinx -W semantics),
    # and building without -W still writes the pages, so the other tests can inspect them
    cmd = [
        sys.executable,
        "-m",
        "sphinx",
        "-E",
        "-q",
        "-b",
        "html",
        "-d",
        str(out / ".doctrees"),
        str(DOCS),
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    return out, result


def test_docs_build_without_warnings(built_docs):
    _out, result = built_docs
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stderr}"
    expected = ""
    actual = result.stderr.strip()
    assert actual == expected


def test_docs_contain_every_page_and_figure(built_docs):
    out, _ = built_docs
    pages = [
        "index",
        "getting_started",
        "user_guide",
        "drizzle3d_class",
        "algorithm",
        "scaling",
        "archive",
        "examples",
        "reference",
        "changelog",
    ]
    for page in pages:
        assert (out / f"{page}.html").exists(), page
    for name in FIGURES:
        png = out / "_images" / name
        assert png.exists(), name
        assert png.stat().st_size > 5000, name


def test_reference_documents_every_public_name(built_docs):
    out, _ = built_docs
    html = (out / "reference.html").read_text()
    missing = []
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        for public in module.__all__:
            if f'id="{name}.{public}"' not in html:
                missing.append(f"{name}.{public}")
    assert missing == []


def test_config_reference_lists_every_key():
    import dataclasses
    import typing

    sys.path.insert(0, str(DOCS))
    try:
        import gen_config
    finally:
        sys.path.remove(str(DOCS))
    from drizzle3d.config import Drizzle3DConfig

    text = gen_config.render()
    hints = typing.get_type_hints(Drizzle3DConfig)
    expected = []
    for f in dataclasses.fields(Drizzle3DConfig):
        sub = hints[f.name]
        if dataclasses.is_dataclass(sub):
            expected += [f"{f.name}.{g.name}" for g in dataclasses.fields(sub)]
        else:
            expected.append(f.name)
    actual = [key for key in expected if f"* - ``{key}``" in text]
    assert actual == expected


BROKEN_DOCTESTS: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=BROKEN_DOCTESTS[n]))
        if n in BROKEN_DOCTESTS
        else n
        for n in PUBLIC_MODULES
    ],
)
def test_module_doctests(name):
    module = importlib.import_module(name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctests failed in {name}"


def test_guide_page_doctests():
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testfile(
        str(DOCS / "drizzle3d_class.rst"), module_relative=False, optionflags=flags, report=False
    )
    assert result.attempted > 20
    assert result.failed == 0


# Modules whose public classes, methods, properties and functions must each carry a complete
# numpydoc docstring (issue 9): every parameter documented, a Returns section when something is
# returned, a Raises section when the code raises, and an Examples section with at least one
# doctest line that runs (``# doctest: +SKIP`` is only for lines that need the real archive).
COMPLETE_DOCSTRING_MODULES = [
    "drizzle3d.archive",
    "drizzle3d.blot",
    "drizzle3d.channels",
    "drizzle3d.cli",
    "drizzle3d.config",
    "drizzle3d.grid",
    "drizzle3d.io",
    "drizzle3d.pipeline",
    "drizzle3d.pixmap",
    "drizzle3d.plotting",
    "drizzle3d.resample",
    "drizzle3d.simulate",
    "drizzle3d.spherex",
]
# numpydoc.validate codes that must not occur: no docstring, undocumented or unknown parameters,
# missing Returns / Yields, missing Examples
_REQUIRED_CODES = {"GL08", "PR01", "PR02", "RT01", "YD01", "EX01"}


def _public_members(module_name):
    """``(dotted name, object)`` of every public function, class, method and property."""
    import inspect

    module = importlib.import_module(module_name)
    out = []
    for name in module.__all__:
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # constants are documented by their attribute docstrings
        out.append((f"{module_name}.{name}", obj))
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                if attr.startswith("_"):
                    continue
                if isinstance(value, classmethod | staticmethod):
                    value = value.__func__
                if isinstance(value, property) or inspect.isfunction(value):
                    out.append((f"{module_name}.{name}.{attr}", value))
    return out


def _raising_code(obj):
    """The functions whose own code has a ``raise`` statement (for a class: its constructor)."""
    import ast
    import inspect
    import textwrap

    if inspect.isclass(obj):
        funcs = [vars(obj)[k] for k in ("__init__", "__post_init__") if k in vars(obj)]
    elif isinstance(obj, property):
        funcs = [obj.fget]
    else:
        funcs = [obj]
    raising = []
    for func in funcs:
        try:
            source = inspect.getsource(func)
        except OSError:  # generated by dataclasses: no code of ours
            continue
        tree = ast.parse(textwrap.dedent(source))
        if any(isinstance(node, ast.Raise) for node in ast.walk(tree)):
            raising.append(func.__qualname__)
    return raising


@pytest.mark.parametrize("module_name", COMPLETE_DOCSTRING_MODULES)
def test_public_docstrings_are_complete(module_name):
    import inspect

    from numpydoc.docscrape import NumpyDocString
    from numpydoc.validate import validate

    parser = doctest.DocTestParser()
    expected = []
    actual = []
    for dotted, obj in _public_members(module_name):
        codes = {code for code, _msg in validate(dotted)["errors"]}
        problems = sorted(codes & _REQUIRED_CODES)
        doc = inspect.getdoc(obj.fget if isinstance(obj, property) else obj) or ""
        sections = NumpyDocString(doc)
        if _raising_code(obj) and not sections["Raises"]:
            problems.append("no Raises section")
        examples = parser.get_examples("\n".join(sections["Examples"]))
        if not any(not ex.options.get(doctest.SKIP) for ex in examples):
            problems.append("no executed doctest line")
        if problems:
            actual.append(f"{dotted}: {', '.join(problems)}")
    assert actual == expected


def test_docstring_check_can_fail():
    """The completeness check above flags a function that lacks every required section."""
    from numpydoc.validate import validate

    codes = {code for code, _msg in validate("drizzle3d.grid._as_edges")["errors"]}
    expected = {"GL08"}
    actual = codes & _REQUIRED_CODES
    assert actual == expected
    assert _raising_code(importlib.import_module("drizzle3d.grid")._as_edges) == ["_as_edges"]
