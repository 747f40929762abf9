"""The code base keeps its shape: lint (pyflakes' rules and private access, ruff), the layers of
the package (import-linter), no import cycle between modules, no module too long to read."""
import ast
import os
import subprocess
import sys

import grimp

from conftest import ROOT

MAX_MODULE_LINES = 400
LINTED = ["distft", "tests", "launch/hosts.py", "launch/serve_onnx.py"]


def tool(name):
    return os.path.join(os.path.dirname(sys.executable), name)


def test_ruff_finds_nothing():
    """pyflakes' rules (unused imports, undefined names) and private access (SLF): a private field of
    MXNet, Gluon or gluon.Trainer is read in the three seams alone, each use marked."""
    proc = subprocess.run([tool("ruff"), "check", "--no-cache", *LINTED], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_private_framework_access_is_in_three_seams():
    marked = sorted({os.path.relpath(os.path.join(d, f), ROOT) for d, _, files in os.walk(os.path.join(ROOT, "distft"))
                     for f in files if f.endswith(".py") and "noqa: SLF001" in open(os.path.join(d, f)).read()})
    assert marked == ["distft/components/optim.py", "distft/distributed/syncbn.py", "distft/models/gluon.py"]


def test_the_import_contracts_hold():
    """pyproject.toml's contracts: the layers (each package imports only from those below it),
    Horovod and MPI behind the distributed seam, the doctor and the launcher light."""
    proc = subprocess.run([tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_module_imports_itself_back_through_others():
    """No import cycle between distft's modules, imports inside functions included."""
    graph = grimp.build_graph("distft")
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(m):  # Tarjan's strongly connected components
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in edges[m]:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(10000)
    for m in modules:
        if m not in index:
            visit(m)
    assert cycles == []


def test_no_module_is_over_400_lines():
    long = {}
    for d, _, files in os.walk(os.path.join(ROOT, "distft")):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(d, f)) as fh:
                    n = sum(1 for _ in fh)
                if n > MAX_MODULE_LINES:
                    long[os.path.relpath(os.path.join(d, f), ROOT)] = n
    assert long == {}


def test_distft_imports_its_own_modules_at_the_top():
    """An import of a distft module inside a function hides a dependency from the reader; the
    command line alone defers them (each command imports what it runs), and the CUDA import
    hook (it runs at every interpreter's start-up)."""
    allowed = {"distft/cli.py", "distft/gpu/cudalibs.py"}
    inner = []
    for d, _, files in os.walk(os.path.join(ROOT, "distft")):
        for f in files:
            path = os.path.join(d, f)
            rel = os.path.relpath(path, ROOT)
            if not f.endswith(".py") or rel in allowed:
                continue
            tree = ast.parse(open(path).read())
            for fn in ast.walk(tree):
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for node in ast.walk(fn):
                        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("distft")):
                            inner.append(f"{rel}:{node.lineno}")
    assert inner == []
