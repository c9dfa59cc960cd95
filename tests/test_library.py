"""Registration: opcheck on every op, torch.compile(fullgraph=True) tracing,
inference-only autograd, the build's guard against pip's build isolation, and
the oracle's independence from the library (no imports either way)."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mvm_cuda
from conftest import installed_package_env

ROOT = Path(__file__).resolve().parent.parent


def _samples(device):
    p = torch.full((2, 12), 1 / 12, dtype=torch.float64, device=device)
    alpha = torch.rand(3, 12, dtype=torch.float64, device=device)
    return [
        (torch.ops.mvm.project_simplex.default, (torch.randn(3, 7, device=device), 1.5), {}),
        (torch.ops.mvm.mvm_step.default, (p, alpha[:2], 5, 1e-3), {}),
        (torch.ops.mvm.solve_mvm.default, (alpha, 6, "kkt", 100, 1e-6), {}),
        (torch.ops.mvm.solve_mvm.default, (alpha, 6, "pgd", 100, 1e-6), {}),
        (torch.ops.mvm.sample_rows.default, (torch.rand(4, 3, 4, 5, device=device), p, 4), {}),
        (torch.ops.mvm.sample_rows.default, (torch.rand(4, 5, 3, 4, device=device).permute(0, 2, 3, 1), p, 4),
         {"generator": torch.Generator(device=device).manual_seed(0)}),
        (torch.ops.mvm.sap_sample.default, (torch.relu(torch.randn(4, 3, 4, 5, device=device)), 30), {}),
        (torch.ops.mvm.sap_sample.default,
         (torch.rand(4, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last), 7), {"scale_only": True}),
        (torch.ops.mvm.sap_sample.default, (torch.rand(4, 3, 4, 10, device=device)[..., ::2], 9), {}),  # copied
        # per-sample keys: the eager and traced runs draw the same
        (torch.ops.mvm.sample_rows.default, (torch.rand(4, 3, 4, 5, device=device), p, 4),
         {"keys": torch.arange(4, device=device)}),
        (torch.ops.mvm.sample_rows.default, (torch.rand(4, 3, 4, 5, device=device), p, 2000),  # exact path
         {"keys": torch.arange(8, device=device)[::2]}),
        (torch.ops.mvm.sap_sample.default, (torch.relu(torch.randn(4, 3, 4, 5, device=device)), 30),
         {"scale_only": True, "keys": torch.tensor([7, -1, 2**62, 0], device=device)}),
        (torch.ops.mvm.keyed_uniform.default, (torch.arange(5, device=device), 7), {}),
        (torch.ops.mvm.keyed_uniform.default, (torch.arange(5, device=device), 3), {"dtype": torch.float64}),
        # fused ReLU and stacked copies (keys for every output sample)
        (torch.ops.mvm.sample_rows.default, (torch.randn(4, 5, 3, 4, device=device).permute(0, 2, 3, 1), p, 4),
         {"keys": torch.arange(12, device=device), "relu": True, "copies": 3}),
        (torch.ops.mvm.sap_sample.default,
         (torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last), 30),
         {"keys": torch.arange(6, device=device), "relu": True, "copies": 3}),
        (torch.ops.mvm.keyed_dropout.default, (torch.randn(2, 3, 4, 5, device=device), torch.arange(4, device=device),
                                               0.5), {"relu": True, "copies": 2}),
    ]


@pytest.mark.parametrize("case", range(17))
def test_opcheck(device, case):
    op, args, kwargs = _samples(device)[case]
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if "generator" in kwargs:
        # An explicit generator advances between opcheck's eager and traced
        # runs, so their draws differ by design (and torch.compile cannot take
        # a Generator argument: see ops.sample_rows).
        utils = utils[:3]
    torch.library.opcheck(op, args, kwargs, test_utils=utils)


def test_compile_fullgraph_traces_every_op(device):
    torch._dynamo.reset()

    def pipeline(h, alpha):
        p = mvm_cuda.solve_mvm(alpha, 8, "kkt")
        q = mvm_cuda.mvm_step(p, alpha, 8, 1e-4)
        q = mvm_cuda.project_simplex(q, 1.0)
        return mvm_cuda.sample_rows(h, q, 8) + mvm_cuda.sap_sample(h, 0.5), mvm_cuda.solve_mvm(alpha, 8, "pgd")

    compiled = torch.compile(pipeline, fullgraph=True)
    h = torch.rand(4, 3, 5, 2, device=device)
    alpha = mvm_cuda.row_alpha(h[:2]).double()
    torch.manual_seed(0)
    out, p_pgd = compiled(h, alpha)
    torch.manual_seed(0)
    expected, p_pgd_eager = pipeline(h, alpha)
    assert torch.equal(out, expected)  # the same default generator draws
    assert torch.allclose(p_pgd, p_pgd_eager)


def test_compile_fullgraph_with_keys(device):
    # Keyed draws under torch.compile: the fake kernels take keys, and the
    # compiled graph draws what eager mode draws (no generator state involved).
    torch._dynamo.reset()

    def pipeline(h, p, keys):
        mask = mvm_cuda.keyed_uniform(keys, h.shape[1] * h.shape[2]) < 0.5
        return (mvm_cuda.sample_rows(h, p, 8, keys=keys) + mvm_cuda.sap_sample(h, 0.5, keys=keys),
                mvm_cuda.sap_scale(h, 0.5, keys=keys), mask)

    compiled = torch.compile(pipeline, fullgraph=True)
    h = torch.rand(4, 3, 5, 2, device=device)
    p = torch.full((2, 15), 1 / 15, dtype=torch.float64, device=device)
    keys = torch.arange(4, device=device) + 2**40
    for got, want in zip(compiled(h, p, keys), pipeline(h, p, keys)):
        assert torch.equal(got, want)


def test_every_op_is_inference_only():
    a = torch.rand(2, 5, dtype=torch.float64, requires_grad=True)
    for out in (mvm_cuda.project_simplex(a), mvm_cuda.solve_mvm(a, 3), mvm_cuda.mvm_step(a.detach(), a, 3, 0.1)):
        with pytest.raises(RuntimeError, match="inference-only and has no gradient"):
            out.sum().backward()


def test_build_without_torch_stops_with_instructions(tmp_path):
    # What pip's build isolation sees: no torch. setup.py must stop at once and
    # say what to type, never build against another torch.
    code = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; exec(open('setup.py').read())"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "none was found" in result.stderr and "Install torch first" in result.stderr


def test_value_checks_switch():
    before = mvm_cuda.set_value_checks(True)
    try:
        assert mvm_cuda.set_value_checks(False) is True
        assert mvm_cuda.set_value_checks(before) is False
    finally:
        mvm_cuda.set_value_checks(before)


def _imports(path: Path, *, module_level: bool):
    """The modules `path` imports, resolved to absolute names; module_level=True skips
    imports inside function bodies (those run only when the function is called)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                found.extend(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parent + ([child.module] if child.module else []))
                found.extend([base] + [f"{base}.{alias.name}" for alias in child.names])
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_reference_and_library_import_neither_way(tmp_path):
    # The oracle must not share code with what it checks: reference.py imports
    # nothing of the package, and no library module imports it when loaded.
    ref_imports = _imports(ROOT / "mvm_cuda" / "reference.py", module_level=False)
    assert ref_imports and not [m for m in ref_imports if m.split(".")[0] == "mvm_cuda"], ref_imports
    library = [p for p in (ROOT / "mvm_cuda").rglob("*.py") if p.name != "reference.py"]
    assert len(library) > 5
    for path in library:
        bad = [m for m in _imports(path, module_level=True) if m == "mvm_cuda.reference"]
        assert not bad, f"{path.relative_to(ROOT)} imports mvm_cuda.reference at module level"
    code = ("import sys, mvm_cuda, mvm_cuda.eval.reproduce, mvm_cuda.eval.adaptive; "
            "assert 'mvm_cuda.reference' not in sys.modules, 'loaded'; "
            "assert mvm_cuda.reference.solve_mvm is not mvm_cuda.solve_mvm")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=installed_package_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def _readme_detector_example() -> str:
    """The python code blocks of the README's "The detector" section, in order."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## The detector\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the README's detector section should hold the Detector and DetectorSearch examples"
    return "\n".join(blocks)


@pytest.mark.usefixtures("one_thread")
def test_readme_detector_example_runs_as_written(tmp_path, monkeypatch):
    """The README's detector example, as a user copies it: self-contained, no placeholder."""
    code = _readme_detector_example()
    assert "..." not in code.replace("# ", "")  # no `model = ...` for the user to fill in
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "det.json").is_file() and 0 <= namespace["report"].auc <= 1
    assert namespace["det"].threshold is not None and namespace["search"].best_params_


README = ROOT / "README.md"


def test_readme_stays_a_short_users_document():
    """The README is what a user reads in five minutes (issue 27): reference material,
    tables of other runs included, belongs in docs/, linked from the README."""
    size = len(README.read_bytes())
    assert size <= 16000, f"README.md is {size} bytes, over 16,000: move reference material to docs/"


def _registered_ops() -> set[str]:
    """The mvm library's ops that take a tensor, internal test ops (_name) aside."""
    names = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mvm::")}
    return {n for n in names if not n.startswith("_")
            and any(str(a.type).startswith("Tensor") for a in getattr(torch.ops.mvm, n).default._schema.arguments)}


def test_readme_op_table_lists_the_registered_ops():
    section = README.read_text().split("## The ops", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(?:mvm_cuda\.)?(\w+)\(", section, flags=re.M))
    ops = _registered_ops()
    assert {"sample_rows", "keyed_dropout"} <= ops
    assert ops <= listed, f"ops missing from the README's table: {sorted(ops - listed)}"
    assert listed <= ops | set(mvm_cuda.__all__), f"not ops of the library: {sorted(listed - ops - set(mvm_cuda.__all__))}"


NUMBER_WORDS = {w: n for n, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}
# "all five ops", "the 6 CUDA kernels", "seven operators": a count of the ops, which goes stale.
OP_COUNT = re.compile(rf"(?<![\w-])({'|'.join(NUMBER_WORDS)}|\d+) (?:CUDA |compiled |custom )?(?:ops|operators|kernels)\b", re.I)


def test_docs_count_and_cover_the_registered_ops():
    """Every registered op has its CUDA kernel (docs/performance.md: "the CUDA kernels (every
    op)"), and no user document states a number of ops other than the registered one."""
    ops = _registered_ops()
    cuda = set(re.findall(r'TORCH_LIBRARY_IMPL\(mvm, CUDA, m\) \{ m\.impl\("(\w+)"',
                          "".join(p.read_text() for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu")))))
    assert cuda == ops, f"ops without a CUDA kernel: {sorted(ops - cuda)}; kernels of no op: {sorted(cuda - ops)}"
    assert "the CUDA kernels (every op)" in (ROOT / "docs" / "performance.md").read_text()
    files = [README, *sorted((ROOT / "docs").glob("*.md"))]
    counts = [(f"{path.name}:{n}", m.group(0)) for path in files
              for n, line in enumerate(path.read_text().splitlines(), 1) for m in OP_COUNT.finditer(line)
              if NUMBER_WORDS.get(m.group(1).lower(), m.group(1)) not in (len(ops), str(len(ops)))]
    assert not counts, f"the library registers {len(ops)} ops: {counts}"


@pytest.mark.parametrize("module", ["sklearn", "scipy"])
def test_a_missing_optional_dependency_names_the_extra(module, monkeypatch):
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, as when not installed
    package = {"sklearn": "scikit-learn", "scipy": "scipy"}[module]
    with pytest.raises(ImportError, match=rf'roc_report needs {package}, which is not installed: install the eval '
                                          rf'extra, pip install "\.\[eval\]"'):
        mvm_cuda.roc_report(torch.zeros(3), torch.ones(3))
    from mvm_cuda.eval import data

    if module == "sklearn":
        with pytest.raises(ImportError, match=r'load_digits needs scikit-learn, .* pip install "\.\[eval\]"'):
            data.load_digits()


ROOT = Path(__file__).resolve().parent.parent
# Phrases about the machines the project is developed on, which a user's documentation has no use for.
MACHINE_TALK = re.compile(r"development VM|this VM|2-core VM|noisy VM|loaded VM|lent GPU|GPU machine's|"
                          r"other sessions|one 240 s call", re.I)


def test_user_docs_name_the_cpu_not_the_development_machine():
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = [f"{path.name}:{n}: {m.group(0)}" for path in files
             for n, line in enumerate(path.read_text().splitlines(), 1) for m in MACHINE_TALK.finditer(line)]
    assert not found, found
    assert "2-core AMD EPYC" in (ROOT / "docs" / "performance.md").read_text()
    assert "if you set it (optional)" in (ROOT / "README.md").read_text()  # gpu_check.sh's $OUT


@pytest.mark.parametrize("index", ["", "https://download.pytorch.org/whl/cpu"])
def test_make_takes_torch_from_the_index_it_is_given(index, tmp_path):
    """TORCH_INDEX is empty by default (pip's own index, reachable where the tests run);
    set, torch and only torch comes from it."""
    done = subprocess.run(["make", "-n", f"VENV={tmp_path / 'venv'}", f"{tmp_path / 'venv'}/.deps",
                           *([f"TORCH_INDEX={index}"] if index else [])],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if " install " in line and "--upgrade pip" not in line]
    torch_line = next(line for line in lines if "torch==" in line)
    if index:
        assert f'--index-url "{index}"' in torch_line
        assert all("--index-url" not in line for line in lines if line is not torch_line)
    else:
        assert all("--index-url" not in line for line in lines)
