"""Optional dependencies (the `eval` extra): imported where needed, with an error that
says how to install them."""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]

_PACKAGES = {"sklearn": "scikit-learn", "scipy": "scipy", "matplotlib": "matplotlib"}


def require(module: str, user: str) -> ModuleType:
    """The module `module` (e.g. "sklearn.metrics"), imported. Raises ImportError naming
    `user` (the function that needs it), the package and the extra that brings it:
    pip install ".[eval]" from the repository."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ImportError(f"{user} needs {_PACKAGES.get(top, top)}, which is not installed: install the eval "
                          f"extra, pip install \".[eval]\" from the repository (or pip install "
                          f"{_PACKAGES.get(top, top)})") from e
