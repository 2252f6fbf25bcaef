"""Package-level checks: the public surface and what importing it costs."""

import subprocess
import sys

import drizzle3d


def test_public_names_resolve():
    for name in drizzle3d.__all__:
        assert getattr(drizzle3d, name) is not None, name


def test_import_does_not_load_heavy_optional_modules():
    code = (
        "import sys, drizzle3d; "
        "mods = ('pyvo', 'matplotlib', 'distributed', 'requests'); "
        "heavy = [m for m in mods if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
