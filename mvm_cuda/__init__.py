"""mvm_cuda: Matricized Variance Minimization, a randomized adversarial-example
detector for pretrained CNNs, with its sampling and solver ops as compiled
PyTorch operators (torch.ops.mvm.*)."""
import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.mvm.*)
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        f"mvm_cuda: cannot load the compiled ops (mvm_cuda._C) with torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}). The extension must be built against the torch that is "
        "installed now: reinstall with `pip install --no-build-isolation .`. If you are running "
        "from the source folder, install the package (or use `pip install -e . "
        f"--no-build-isolation`) first. Original error: {e}"
    ) from e

from .ops import (  # noqa: E402
    keyed_dropout,
    keyed_uniform,
    project_simplex,
    mvm_step,
    row_alpha,
    sample_rows,
    sap_sample,
    sap_scale,
    set_value_checks,
    solve_mvm,
)

__all__ = [
    "project_simplex",
    "mvm_step",
    "solve_mvm",
    "sample_rows",
    "sap_sample",
    "sap_scale",
    "keyed_uniform",
    "keyed_dropout",
    "row_alpha",
    "set_value_checks",
]
__version__ = "0.1.0"

# MVM_CHECK_VALUES is read by the compiled library when it loads, by one rule
# for C++ and Python (csrc/ops.cpp); a value outside that rule warns here, at
# the user's import.
if _C.value_checks_warning:
    import warnings

    warnings.warn(_C.value_checks_warning, UserWarning, stacklevel=2)


# The layer a user puts into their own model: sampling units and the detector (Alg. 3).
from .nn import (DropoutUnit, MVMUnit, SAPUnit, SamplingUnit, insert_units, sampling_units,  # noqa: E402
                 set_differentiable, set_mode)
from .detector import Detector, roc_report  # noqa: E402
from .calibration import DetectorSearch  # noqa: E402
from .malloc import keep_freed_memory  # noqa: E402



def __getattr__(name):
    # The oracle stays out of the library's imports; `mvm_cuda.reference`
    # still works as an attribute (e.g. Detector(..., backend=mvm_cuda.reference)).
    if name == "reference":
        import importlib

        return importlib.import_module(".reference", __name__)
    raise AttributeError(f"module 'mvm_cuda' has no attribute {name!r}")


__all__ += [
    "SamplingUnit",
    "MVMUnit",
    "SAPUnit",
    "DropoutUnit",
    "insert_units",
    "sampling_units",
    "set_mode",
    "set_differentiable",
    "Detector",
    "roc_report",
    "DetectorSearch",
    "keep_freed_memory",
]
