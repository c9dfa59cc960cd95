"""Build of mvm_cuda's compiled ops (mvm_cuda._C).

The extension is compiled against the torch that is installed: `pip install .`
finds it through the in-tree build backend (backend/torch_aware_backend.py),
`pip install --no-build-isolation .` sees it directly.
CUDA kernels are built when torch was built with CUDA and nvcc is found
(not when a GPU happens to be visible); MVM_FORCE_CPU=1 / MVM_FORCE_CUDA=1
override. On a machine without network: pip install --no-build-isolation --no-deps --no-index .
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

try:
    import torch
except ImportError:
    sys.exit(
        "mvm_cuda is compiled against the torch you have installed, and none was found.\n"
        "Install torch first (e.g. pip install torch==2.13.0), then run: pip install .\n"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def torch_floor():
    """The lowest torch version pyproject.toml's dependencies accept, as a tuple."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        m = re.search(r'"torch\s*>=\s*([0-9][0-9.]*)', f.read())
    return tuple(int(v) for v in m.group(1).split(".")) if m else ()


def version_tuple(version):
    return tuple(int(v) for v in re.match(r"[0-9]+(\.[0-9]+)*", version).group(0).split("."))


FLOOR = torch_floor()
if version_tuple(torch.__version__)[: len(FLOOR)] < FLOOR:
    sys.exit(
        f"mvm_cuda needs torch >= {'.'.join(map(str, FLOOR))} (pyproject.toml), but the installed "
        f"torch is {torch.__version__} ({os.path.dirname(torch.__file__)}). Upgrade torch, then build again.\n"
    )


def find_cuda_home():
    """The CUDA toolkit folder: $CUDA_HOME if set, else the one nvcc itself reports.

    nvcc on PATH may be a wrapper script in a general bin folder, from which
    torch would guess a wrong CUDA_HOME (its parent), so ask nvcc for its TOP.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        open(src, "w").close()
        out = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                             capture_output=True, text=True).stderr
    top = re.search(r"^#\$ TOP=(.*)$", out, re.M)
    return os.path.realpath(top.group(1).strip()) if top else os.path.dirname(os.path.dirname(nvcc))


def want_cuda():
    if os.environ.get("MVM_FORCE_CPU") == "1":
        print("mvm_cuda: MVM_FORCE_CPU=1, building the CPU kernels only")
        return False
    force = os.environ.get("MVM_FORCE_CUDA") == "1"
    if torch.version.cuda is None:
        if force:
            sys.exit("mvm_cuda: MVM_FORCE_CUDA=1 but this torch was built without CUDA")
        print("mvm_cuda: torch was built without CUDA, building the CPU kernels only")
        return False
    cuda_home = find_cuda_home()
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        if force:
            sys.exit("mvm_cuda: MVM_FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        print("mvm_cuda: nvcc not found (set CUDA_HOME), building the CPU kernels only")
        return False
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    return True


def extension():
    use_cuda = want_cuda()
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math lets GCC turn the samplers' selects into vector
    # blends (nothing here reads floating-point exception flags). -fopenmp:
    # at::parallel_for is a header template that parallelises with `omp
    # parallel` pragmas, which without it are ignored (the kernels then run on
    # one thread, whatever torch.set_num_threads says). The libgomp this links
    # is the one torch has already loaded (same soname).
    # -std=c++20 explicitly: torch 2.11's cpp_extension adds -std=c++17 when
    # none is given (the kernels use std::bit_cast); newer torch needs 20 anyway.
    cxx = ["-std=c++20", "-O3", "-fno-trapping-math", "-fopenmp", "-fdiagnostics-color=always"]
    if os.environ.get("MVM_SANITIZE") == "1":
        cxx += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if os.environ.get("MVM_SANITIZE") == "1":
        kwargs["extra_link_args"] += ["-fsanitize=address,undefined"]
    if not use_cuda:
        return CppExtension("mvm_cuda._C", sources, **kwargs)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    # A minimal toolkit may lack headers that ATen's CUDA headers include
    # (cusparse.h, curand_kernel.h); CUDA builds of torch ship them, in the
    # nvidia wheels beside torch or anywhere on sys.path.
    include_dirs = sorted({os.path.realpath(d) for p in sys.path if p
                           for d in glob.glob(os.path.join(p, "nvidia", "cu*", "include"))})
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # H100/H200; needed when no GPU is visible
    # No --use_fast_math: the kernels rely on exact expm1/log1p.
    kwargs["extra_compile_args"]["nvcc"] = ["-std=c++20", "-O3", "-lineinfo"]
    return CUDAExtension("mvm_cuda._C", sources, include_dirs=include_dirs,
                         define_macros=[("MVM_WITH_CUDA", "1")], **kwargs)


if __name__ == "__main__":
    ext = extension()  # first: it sets CUDA_HOME, which cpp_extension reads at import
    from torch.utils.cpp_extension import BuildExtension

    setup(
        packages=find_packages(include=["mvm_cuda", "mvm_cuda.*"]),
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
