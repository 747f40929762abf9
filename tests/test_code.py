"""The code base stays free of unused imports and undefined names."""
import subprocess
import sys

from conftest import ROOT


def test_pyflakes_is_clean():
    proc = subprocess.run([sys.executable, "-m", "pyflakes", "distft", "tests", "launch/hosts.py", "launch/serve_onnx.py"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
