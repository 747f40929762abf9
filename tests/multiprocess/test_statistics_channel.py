"""The MPI statistics channel under mpirun: a late peer is waited for without holding a core."""
import shutil
import sys

import pytest

from conftest import run_cli  # noqa: F401 - the import path of tests/support
from jobs import MPI_ENV, ROOT

pytestmark = pytest.mark.horovod


def test_a_late_peer_is_waited_for_with_the_core_given_away_and_the_sum_is_right():
    """The wait spins 20 us, yields the core for 5 ms (any runnable thread first), then polls with
    sleeps growing to 1 ms: a rank whose peer comes 0.4 s late spends a small part of that on the
    CPU. A blocking MPI wait, or yields all along, take the whole 0.4 s of a core; 10 us sleeps
    all along took 0.28 s of it."""
    import os
    import subprocess

    mpirun = shutil.which("mpirun")
    proc = subprocess.run([mpirun, "-np", "2", "--oversubscribe", sys.executable, "tests/helpers/late_peer.py", "0.4"],
                          cwd=ROOT, env={**os.environ, **MPI_ENV}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("wall "))
    _, wall, _, cpu, _, first, last = line.split()
    assert float(first) == float(last) == 3.0  # 1 + 2, every value
    assert float(wall) >= 0.3  # it did wait for the late rank
    assert float(cpu) < 0.25 * float(wall), line
