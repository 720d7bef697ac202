"""Load a script of scripts/ as a module, so tests call its main() in-process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def load_script(name: str):
    """scripts/<name>.py as a module, with scripts/ on the path as Python puts it there when it runs a script,
    so the script's imports of its siblings (``import benchmark_step``) resolve the same way."""
    scripts = str(ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
