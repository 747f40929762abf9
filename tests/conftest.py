"""The fixtures every test may take (a pretrained backbone), the order the tests run in, and the
`slow` marker of every multi-process, cluster and install test.

The tests mirror the package: unit/<package>/ holds in-process tests; multiprocess/, cluster/
and install/ the slow ones; support/ what tests share (on the import path: `from jobs import`,
`from cluster import`, ...). What most tests need is in support/jobs.py, also importable from
here (`from conftest import run_cli`)."""
import os
import sys
import tempfile

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(TESTS, "support"))

from jobs import (MPI_ENV, ROOT, assert_same_weights, horovodrun, kustomize, load_params,  # noqa: F401
                  make_pretrained, pretrain_backbone, read_summary, run_cli, small_config, write_config)

# verdicts of the data check (distft check, and training's pass before the first step) go to a
# scratch folder, not the user's ~/.cache/distft
os.environ.setdefault("DISTFT_CACHE_DIR", tempfile.mkdtemp(prefix="distft-test-cache-"))

SLOW_FOLDERS = ("multiprocess", "cluster", "install")  # every test in them starts several processes


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    return pretrain_backbone(tmp_path_factory.mktemp("pre"))


def pytest_collection_modifyitems(session, config, items):
    """Every test in multiprocess/, cluster/ or install/, and every test that launches horovodrun
    (marked `horovod`) wherever it is, is `slow`: `pytest -m "not slow"` runs the in-process
    ones. Tests marked `install` run last: launch/test.sh builds their install in the
    background while the others run, and they wait for it."""
    for item in items:
        folder = os.path.relpath(str(item.path), TESTS).split(os.sep)[0]
        if folder in SLOW_FOLDERS or item.get_closest_marker("horovod") or item.get_closest_marker("install"):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("install") is not None)
