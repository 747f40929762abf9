"""The GPU install (DISTFT_EXTRA=cu112) built and checked on this machine, which has no GPU and no
driver: its own venv, mxnet-cu112 with the CUDA 11 libraries from the registry, Horovod built
with NCCL by a CUDA 11.8 toolchain; what `distft doctor` reads from the real files; and, with a
stand-in driver built here, MXNet and Horovod importing and one CPU training step.

launch/test.sh starts the install in the background (it is slow with cold caches) and these tests,
which pytest runs last, wait for it; run alone, the fixture runs the install (seconds when cached)."""
import glob
import json
import os
import subprocess
import time

import pytest

from conftest import ROOT, make_pretrained, small_config, write_config
from gpustub import build_driver, driver_imports

pytestmark = pytest.mark.install
WHEEL_SASS = ["sm_50", "sm_60", "sm_70", "sm_80", "sm_86"]  # the mxnet-cu112 1.9.1 wheel (issue #25)
INSTALL_TIMEOUT = 45 * 60


@pytest.fixture(scope="module")
def cu112(tmp_path_factory):
    """(venv, install exit code, install log) of `DISTFT_EXTRA=cu112 bash launch/install.sh`."""
    venv = os.environ.get("DISTFT_CU112_VENV") or os.path.join(ROOT, ".venv-cu112")
    rc_file = os.environ.get("DISTFT_CU112_INSTALL_RC")
    if rc_file:  # launch/test.sh started it
        log_file = os.environ["DISTFT_CU112_INSTALL_LOG"]
        deadline = time.monotonic() + INSTALL_TIMEOUT
        while not os.path.exists(rc_file) or not open(rc_file).read().strip():
            assert time.monotonic() < deadline, f"the cu112 install is still running after {INSTALL_TIMEOUT} s: {log_file}"
            time.sleep(5)
        rc = int(open(rc_file).read())
    else:
        log_file = str(tmp_path_factory.mktemp("cu112") / "install.log")
        with open(log_file, "w") as log:
            rc = subprocess.run(["bash", os.path.join(ROOT, "launch", "install.sh")], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT,
                                env={**os.environ, "DISTFT_EXTRA": "cu112", "DISTFT_DEV": "0",
                                     "DISTFT_VENV": venv}).returncode
    with open(log_file) as fh:
        log = fh.read()
    return venv, rc, log


@pytest.fixture(scope="module")
def venv(cu112):
    path, rc, log = cu112
    if rc != 0:
        pytest.fail(f"the cu112 install failed (exit {rc}):\n{log[-4000:]}")
    return path


def run(venv, args, env=None, cwd=ROOT, timeout=300):
    return subprocess.run([os.path.join(venv, "bin", "python")] + args, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1",
                                                "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", **(env or {})})


def site_packages(venv):
    return glob.glob(os.path.join(venv, "lib", "python3*", "site-packages"))[0]


@pytest.fixture(scope="module")
def stub_driver(venv, tmp_path_factory):
    """A libcuda.so.1 with only what libmxnet.so and Horovod's library import from the driver
    (read from their files); its functions return CUDA_ERROR_NO_DEVICE. For this test only."""
    site = site_packages(venv)
    libraries = [os.path.join(site, "mxnet", "libmxnet.so")] + glob.glob(os.path.join(site, "horovod", "mxnet", "mpi_lib*.so"))
    return build_driver(str(tmp_path_factory.mktemp("stub")), imported=driver_imports(*libraries))


def test_the_cu112_install_exits_0(cu112):
    _venv, rc, log = cu112
    assert rc == 0, log[-4000:]
    assert "[install] ready:" in log and "(cu112)" in log


def test_doctor_reads_the_wheels_kernels_and_horovods_nccl_from_the_files(venv, tmp_path):
    out = tmp_path / "doctor.json"
    proc = run(venv, ["-m", "distft", "doctor", "--json", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU is visible here" in proc.stdout
    report = json.loads(out.read_text())
    mx, hvd = report["mxnet"], report["horovod"]
    assert (mx["version"], mx["distribution"]) == ("1.9.1", "mxnet-cu112")
    assert mx["kernels"] == {"sass": WHEEL_SASS, "ptx": []}
    assert mx["library"].startswith(site_packages(venv))
    assert mx["cuda"]["built_with"] == "11.2" and mx["cudnn"]["provided_by"] == "nvidia-cudnn-cu11 8.9.6.50"
    assert mx["nccl"]["provided_by"] == "nvidia-nccl-cu11 2.21.5"
    assert {k for k, v in mx["features"].items() if v} >= {"CUDA", "CUDNN", "NCCL"}
    assert [s for s, path in mx["needed"].items() if path is None] == ["libcuda.so.1"]  # only the driver is absent
    assert (hvd["version"], hvd["mpi"], hvd["gloo"], hvd["nccl"], hvd["nccl_version"]) == \
        ("0.28.1", True, True, True, "2.21.5")
    assert report["driver"] is None and report["gpus"] == [] and report["ok"] is True


@pytest.mark.parametrize("capability", ["7.0", "7.5", "8.0", "8.6", "8.9"])
def test_doctor_says_volta_to_ada_can_run_it(venv, capability):
    proc = run(venv, ["-m", "distft", "doctor", "--capability", capability])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"ok: a GPU of compute capability {capability} can run distft" in proc.stdout


@pytest.mark.parametrize("capability,arch", [("9.0", "sm_90"), ("3.7", "sm_37")])
def test_doctor_says_hopper_and_kepler_cannot_and_how_to_fix_it(venv, capability, arch):
    proc = run(venv, ["-m", "distft", "doctor", "--capability", capability])
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert f"a GPU of compute capability {capability} ({arch}) cannot run mxnet-cu112 1.9.1" in line
    assert "sm_50, sm_60, sm_70, sm_80, sm_86 and no PTX" in line
    assert "fix: build MXNet from source with CUDA" in line and f"MXNET_CUDA_ARCH including {capability}" in line


def test_with_a_stub_driver_mxnet_and_horovod_import_and_report_nccl(venv, stub_driver):
    proc = run(venv, ["-c", "import mxnet, horovod.mxnet as hvd\n"
                            "f = mxnet.runtime.Features()\n"
                            "print(mxnet.__version__, mxnet.context.num_gpus(), bool(hvd.nccl_built()), "
                            "hvd.mpi_built(), hvd.gloo_built(), f.is_enabled('CUDA'), f.is_enabled('CUDNN'))"],
               env={"LD_LIBRARY_PATH": stub_driver})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1.9.1", "0", "True", "True", "True", "True", "True"]


def test_with_a_stub_driver_one_cpu_training_step_runs_in_the_gpu_venv(venv, stub_driver, tmp_path):
    doc = small_config(tmp_path, make_pretrained(tmp_path / "pre.params"))
    doc["train"]["max_steps"] = 1
    cfg = write_config(tmp_path / "job.yaml", doc)
    proc = run(venv, ["-m", "distft", "train", "--config", cfg], env={"LD_LIBRARY_PATH": stub_driver}, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "out" / "summary.json") as fh:
        summary = json.load(fh)
    assert summary["steps"] == 1


def test_a_hopper_gpu_stops_train_with_the_doctors_line(venv, tmp_path):
    """A driver built here shows one H100; the GPU wheel has no sm_90 kernel: doctor exits 1 and
    train exits 2, with the same line, before any framework or collective starts."""
    site = site_packages(venv)
    driver = build_driver(str(tmp_path / "driver"), gpus=[("NVIDIA H100 80GB HBM3", 9, 0, 85520809984)],
                          imported=driver_imports(os.path.join(site, "mxnet", "libmxnet.so")))
    env = {"LD_LIBRARY_PATH": driver}
    doc = run(venv, ["-m", "distft", "doctor"], env=env)
    assert doc.returncode == 1
    [line] = doc.stderr.strip().splitlines()
    assert line.startswith("GPU 0 (NVIDIA H100 80GB HBM3) of compute capability 9.0 (sm_90) cannot run mxnet-cu112")
    cfg = write_config(tmp_path / "job.yaml", small_config(tmp_path, str(tmp_path / "none.params")))
    train = run(venv, ["-m", "distft", "train", "--config", cfg], env=env)
    assert train.returncode == 2
    assert train.stderr.strip().splitlines() == [f"distft: error: {line}"]
