"""PEP 517 build backend: setuptools, with the installed torch made visible.

mvm_cuda's extension must be compiled against the torch it will run with.
pip's default build isolation runs this backend with the target interpreter
but hides that interpreter's site-packages, where torch lives; listing torch
in build-system.requires would instead fetch another torch (several GB) and
build against it. So before any hook runs, the folder that holds the target
environment's torch is appended to sys.path (after the build environment's
own packages, so that the isolated setuptools still wins).

The target environment is the running interpreter's (sys.prefix): its own
site-packages come first. $VIRTUAL_ENV and $CONDA_PREFIX are searched only when
the interpreter is a throwaway build environment (pypa/build's isolated
"build-env-*" venv, which never holds torch), so that `python -m build` from an
activated venv builds against that venv's torch. An activated environment other
than the target, holding a torch the target lacks, is an error: a package built
against it would not import (no torch) or would carry another torch's binary.
"""
import os
import site
import sys
import sysconfig

from setuptools import build_meta as _setuptools


def _own_folders():
    """The running interpreter's package folders (its prefix, then the user site)."""
    folders = list(site.getsitepackages())
    if site.ENABLE_USER_SITE is not False:
        folders.append(site.getusersitepackages())
    return folders


def _activated_folders():
    """The package folders of $VIRTUAL_ENV and $CONDA_PREFIX, for this Python version."""
    folders = []
    for prefix in (os.environ.get("VIRTUAL_ENV"), os.environ.get("CONDA_PREFIX")):
        if prefix:
            folders.append(sysconfig.get_path("purelib", vars={"base": prefix, "platbase": prefix}))
            folders.append(sysconfig.get_path("platlib", vars={"base": prefix, "platbase": prefix}))
    return folders


def _is_throwaway_build_env():
    """The interpreter runs in a temporary environment made only to build (pypa/build's
    isolated venv), not in the environment the package will be installed into."""
    return os.path.basename(os.path.normpath(sys.prefix)).startswith("build-env-")


def _candidate_folders():
    """Where the target environment keeps its packages, most specific first: the
    running interpreter's own folders; in a throwaway build environment, then the
    activated environment's."""
    folders = _own_folders()
    if _is_throwaway_build_env():
        folders += _activated_folders()
    return [f for f in dict.fromkeys(folders) if f]  # in order, once each


def _torch_visible():
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _has_torch(folder):
    return os.path.isfile(os.path.join(folder, "torch", "__init__.py"))


def _expose_installed_torch():
    """Append the folder with the target environment's torch to sys.path.

    Returns None when torch is (now) importable, else an error message.
    """
    if _torch_visible():  # --no-build-isolation, or torch already on sys.path
        return None
    folders = _candidate_folders()
    for folder in folders:
        if _has_torch(folder):
            sys.path.append(folder)
            return None
    elsewhere = [f for f in _activated_folders() if f not in folders and _has_torch(f)]
    if elsewhere:
        return (
            "mvm_cuda is compiled against the torch installed for the Python it is installed into, and that\n"
            f"environment has none\n  interpreter: {sys.executable}\n  looked in: {', '.join(folders)}\n"
            f"The activated environment ($VIRTUAL_ENV or $CONDA_PREFIX) has one, in {elsewhere[0]}, but it is\n"
            "another environment: a build against it would not import here. Install torch into the target\n"
            "environment, or run the pip of the activated one."
        )
    return (
        "mvm_cuda is compiled against the torch installed for this Python, and none was found\n"
        f"  interpreter: {sys.executable}\n  looked in: {', '.join(folders) or '(nowhere)'}\n"
        "Install torch first (for example: pip install torch), then run pip install . again."
    )


_ERROR = _expose_installed_torch()


def _with_torch(hook):
    def wrapped(*args, **kwargs):
        if _ERROR is not None:
            raise SystemExit(_ERROR)
        return hook(*args, **kwargs)

    wrapped.__name__ = hook.__name__
    wrapped.__doc__ = hook.__doc__
    return wrapped


get_requires_for_build_wheel = _with_torch(_setuptools.get_requires_for_build_wheel)
get_requires_for_build_sdist = _with_torch(_setuptools.get_requires_for_build_sdist)
get_requires_for_build_editable = _with_torch(_setuptools.get_requires_for_build_editable)
prepare_metadata_for_build_wheel = _with_torch(_setuptools.prepare_metadata_for_build_wheel)
prepare_metadata_for_build_editable = _with_torch(_setuptools.prepare_metadata_for_build_editable)
build_wheel = _with_torch(_setuptools.build_wheel)
build_sdist = _with_torch(_setuptools.build_sdist)
build_editable = _with_torch(_setuptools.build_editable)
