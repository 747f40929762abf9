"""`distft doctor` and the GPU gate of train/check: libraries read from their files (ELF, fatbin),
which GPUs a set of kernels runs on, the probe through the driver API (a driver built here with
gcc: the machine has none), and `train` stopping before any collective on a GPU it cannot run."""
import json
import re
import struct
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli, small_config, write_config
from gpustub import build_driver

from distft import cli
from distft.gpu import cudalibs
from distft.gpu import doctor, install
from distft.gpu import elffile
from distft.gpu import gpus

# what the mxnet-cu112 (and cu117) 1.9.1 wheel's libmxnet.so holds (tests/test_gpu_install.py
# reads it from the real file)
WHEEL = elffile.Kernels(sass=["sm_50", "sm_60", "sm_70", "sm_80", "sm_86"], ptx=[])
H100 = gpus.Gpu(0, "NVIDIA H100 80GB HBM3", (9, 0), 85 * 10**9)
A100 = gpus.Gpu(0, "NVIDIA A100-SXM4-40GB", (8, 0), 42 * 10**9)


# --- reading a library ----------------------------------------------------------------------------


def fatbin_container(entries) -> bytes:
    """A fatbin container as nvcc lays it out: a 16-byte header, then entries (64-byte header +
    payload padded to 8 bytes). entries: [(kind, arch, payload)], kind 1 = PTX, 2 = ELF."""
    body = b""
    for kind, arch, payload in entries:
        padded = payload + b"\0" * (-len(payload) % 8)
        header = struct.pack("<HHIQIIHHI", kind, 0x0101, 64, len(padded), len(payload), 0, 7, 1, arch)
        body += header + b"\0" * (64 - len(header)) + padded
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


@pytest.fixture(scope="module")
def fat_library(tmp_path_factory):
    """A shared library made by gcc whose .nv_fatbin holds two containers, padded apart, with SASS
    for sm_52, sm_70, sm_80 and PTX for compute_80; one payload contains the fatbin magic."""
    blob = (fatbin_container([(2, 70, b"\x7fELF" + b"\x50\xed\x55\xba" * 3 + b"x" * 5), (2, 52, b"cubin")])
            + b"\0" * 8 + fatbin_container([(1, 80, b".version 7.8\n.target sm_80\n"), (2, 80, b"\x7fELF" * 9)]))
    tmp = tmp_path_factory.mktemp("fat")
    src = tmp / "fat.c"
    src.write_text("#include <math.h>\n"
                   '__attribute__((section(".nv_fatbin"), used, aligned(8))) const unsigned char fatbin[] = {'
                   + ",".join(str(b) for b in blob) + "};\n"
                   "double twice(double x) { return ldexp(x, 1); }\n"
                   "int answer(void) { return 42; }\n")
    out = tmp / "libfat.so.3"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-Wl,-soname,libfat.so.3", "-Wl,-rpath,$ORIGIN/lib",
                    "-o", str(out), str(src), "-lm"], check=True)
    return str(out)


def test_kernels_are_read_from_every_fatbin_container(fat_library):
    kernels = elffile.kernels(fat_library)
    assert kernels.sass == ["sm_52", "sm_70", "sm_80"]
    assert kernels.ptx == ["compute_80"]
    assert kernels.containers == 2


def test_needed_libraries_soname_and_run_path_are_read_from_the_dynamic_section(fat_library):
    readelf = subprocess.run(["readelf", "-d", fat_library], capture_output=True, text=True, check=True).stdout
    with elffile.SharedLibrary(fat_library) as lib:
        assert lib.soname == "libfat.so.3"
        assert "libm.so.6" in lib.needed
        assert lib.needed == re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", readelf)
        assert lib.search_path == ["$ORIGIN/lib"]
        assert {"twice", "answer"} <= set(lib.dynamic_symbols(defined=True))
        assert install.built_constant(lib.function_bytes("answer")) == 42


def test_a_library_without_gpu_code_has_no_kernels(fat_library):
    assert elffile.kernels(sys.executable).to_json() == {"sass": [], "ptx": []}


def test_a_file_that_is_not_elf_is_a_clear_error(tmp_path):
    bad = tmp_path / "libmxnet.so"
    bad.write_bytes(b"#!/bin/sh\n" * 10)
    with pytest.raises(elffile.ElfError, match="libmxnet.so: not an ELF file"):
        elffile.kernels(str(bad))


@pytest.mark.parametrize("code,value", [
    (bytes.fromhex("b801000000c3"), 1),  # mov eax, 1; ret
    (bytes.fromhex("31c0c3"), 0),  # xor eax, eax; ret
    (bytes.fromhex("f30f1efab859560000c3"), 22105),  # endbr64; mov eax, 22105 (NCCL 2.21.5); ret
    (bytes.fromhex("20008052c0035fd6"), 1),  # aarch64: mov w0, #1; ret
    (bytes.fromhex("554889e5b801000000"), None),  # a frame set up first: not recognised
])
def test_the_constant_a_built_function_returns_is_read_from_its_code(code, value):
    assert install.built_constant(code) == value


def test_horovods_built_features_are_read_from_its_library():
    """The CPU install's Horovod: MPI and Gloo, no NCCL (what hvd.*_built() answer)."""
    section, kernels, problems = install.read_horovod(install.installed_mxnet(), install.Resolver())
    assert (section["mpi"], section["gloo"], section["nccl"]) == (True, True, False)
    assert kernels.sass == [] and problems == []


def test_cuda_libraries_load_after_what_they_need():
    needs = {"a": ["libc.so.6", "b", "c"], "b": ["c"], "c": [], "unused": []}
    available = {name: name for name in needs}
    assert cudalibs.load_order(["a", "libstdc++.so.6"], available, needs.__getitem__) == ["c", "b", "a"]


def test_the_import_hook_preloads_once_on_the_first_import_of_mxnet(monkeypatch):
    calls = []
    monkeypatch.setattr(cudalibs, "preload", lambda: calls.append(1))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    cudalibs.install_import_hook()
    cudalibs.install_import_hook()
    hooks = [f for f in sys.meta_path if isinstance(f, cudalibs._PreloadBeforeMxnet)]
    assert len(hooks) == 1
    assert hooks[0].find_spec("numpy") is None and calls == []
    assert hooks[0].find_spec("mxnet") is None and calls == [1]
    assert not any(isinstance(f, cudalibs._PreloadBeforeMxnet) for f in sys.meta_path)


# --- which GPUs a set of kernels runs on -----------------------------------------------------------


@pytest.mark.parametrize("capability", [(7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (5, 2), (6, 1)])
def test_the_wheels_kernels_run_from_maxwell_to_ada(capability):
    ok, how = doctor.runs_on(WHEEL, capability)
    assert ok, how


def test_same_major_sass_runs_on_later_minors_only():
    assert doctor.runs_on(WHEEL, (8, 9)) == (True, "sm_86 kernels (binary compatible with 8.9)")
    assert doctor.runs_on(WHEEL, (8, 0)) == (True, "sm_80 kernels")
    assert doctor.runs_on(elffile.Kernels(sass=["sm_86"]), (8, 0))[0] is False


@pytest.mark.parametrize("capability,arch,fix", [
    ((9, 0), "sm_90", "build MXNet from source with CUDA >= 11.8 and MXNET_CUDA_ARCH including 9.0 (+PTX)"),
    ((3, 7), "sm_37", "MXNET_CUDA_ARCH including 3.7"),
    ((10, 0), "sm_100", "CUDA >= 12.8 and MXNET_CUDA_ARCH including 10.0 (+PTX)"),
])
def test_a_gpu_without_kernels_gets_one_line_naming_its_arch_the_wheels_and_the_fix(capability, arch, fix):
    mx = install.MxnetBuild("mxnet-cu112", "1.9.1", "/venv/mxnet/libmxnet.so", WHEEL)
    ok, reason, line = doctor.verdict("a GPU", capability, mx)
    assert not ok and "\n" not in line
    assert f"({arch})" in line and "sm_50, sm_60, sm_70, sm_80, sm_86 and no PTX" in line
    assert "mxnet-cu112 1.9.1" in line and fix in line


def test_ptx_is_compiled_by_the_driver_for_any_later_gpu():
    with_ptx = elffile.Kernels(sass=["sm_80"], ptx=["compute_80"])
    ok, how = doctor.runs_on(with_ptx, (9, 0))
    assert ok and "PTX compute_80" in how
    assert doctor.runs_on(with_ptx, (7, 5))[0] is False


def test_a_cpu_build_runs_on_no_gpu():
    mx = install.MxnetBuild("mxnet", "1.9.1", "/venv/mxnet/libmxnet.so", elffile.Kernels())
    ok, reason, line = doctor.verdict("GPU 0", (8, 0), mx)
    assert not ok and "CPU build" in line and "DISTFT_EXTRA=cu112" in line


def test_capability_must_look_like_x_dot_y():
    assert doctor.parse_capability("8.6") == (8, 6) and doctor.parse_capability("10.0") == (10, 0)
    with pytest.raises(ValueError, match="--capability: 'sm_90' is not a compute capability"):
        doctor.parse_capability("sm_90")


# --- the probe, through a driver built here ------------------------------------------------------


def test_the_probe_lists_gpus_through_the_driver_api(tmp_path, monkeypatch):
    build_driver(str(tmp_path), gpus=[("Fake H100 80GB HBM3", 9, 0, 85520809984), ("Fake L4", 8, 9, 23 * 2**30)])
    monkeypatch.setattr(gpus, "DRIVER_SONAME", str(tmp_path / "libcuda.so.535.104.05"))
    driver, found = gpus.probe()
    assert driver.cuda == "12.2" and driver.version == "535.104.05" and driver.error is None
    assert driver.library == str(tmp_path / "libcuda.so.535.104.05")
    assert found == [gpus.Gpu(0, "Fake H100 80GB HBM3", (9, 0), 85520809984), gpus.Gpu(1, "Fake L4", (8, 9), 23 * 2**30)]


def test_the_probe_reports_the_drivers_error_and_no_gpu(tmp_path, monkeypatch):
    build_driver(str(tmp_path), gpus=[], init=100)
    monkeypatch.setattr(gpus, "DRIVER_SONAME", str(tmp_path / "libcuda.so.1"))
    driver, found = gpus.probe()
    assert found == [] and driver.error == "cuInit: CUDA_ERROR_NO_DEVICE (100)"


def test_the_probe_says_a_stub_is_not_a_driver(tmp_path, monkeypatch):
    build_driver(str(tmp_path), imported=["cuLaunchKernel"])
    monkeypatch.setattr(gpus, "DRIVER_SONAME", str(tmp_path / "libcuda.so.1"))
    driver, found = gpus.probe()
    assert found == [] and "has no cuDriverGetVersion: not a CUDA driver" in driver.error


def test_no_driver_library_means_no_driver_and_no_gpu(monkeypatch):
    monkeypatch.setattr(gpus, "DRIVER_SONAME", "libcuda-that-is-not-here.so.1")
    assert gpus.probe() == (None, [])


# --- distft doctor on this (CPU) install -----------------------------------------------------------

FIXED = {"mxnet": {"version", "cuda", "cudnn", "nccl", "kernels"}, "horovod": {"version", "mpi", "gloo", "nccl"},
         "gpu": {"index", "name", "capability", "memory_bytes", "supported", "reason"}}


def test_doctor_on_a_machine_without_driver_reads_the_files_and_exits_0(tmp_path):
    out = tmp_path / "doctor.json"
    proc = run_cli(["doctor", "--json", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU is visible here" in proc.stdout
    report = json.loads(out.read_text())
    assert FIXED["mxnet"] <= set(report["mxnet"]) and FIXED["horovod"] <= set(report["horovod"])
    assert report["mxnet"]["version"] == "1.9.1" and report["mxnet"]["kernels"] == {"sass": [], "ptx": []}
    assert report["mxnet"]["cuda"] is None and report["mxnet"]["features"]["OPENMP"] is True
    assert (report["horovod"]["mpi"], report["horovod"]["gloo"], report["horovod"]["nccl"]) == (True, True, False)
    assert report["driver"] is None and report["gpus"] == [] and report["ok"] is True


def test_doctor_lists_each_visible_gpu_and_judges_it(tmp_path):
    """A driver with an H100 (built here): the CPU build runs on no GPU, so exit 1, and the JSON
    says so per GPU, with the fixed keys."""
    stub = build_driver(str(tmp_path / "driver"), gpus=[("Fake H100 80GB HBM3", 9, 0, 85520809984)])
    out = tmp_path / "doctor.json"
    proc = run_cli(["doctor", "--json", str(out)], env={"LD_LIBRARY_PATH": stub})
    assert proc.returncode == 1
    assert "GPU 0 (Fake H100 80GB HBM3) of compute capability 9.0 (sm_90): mxnet 1.9.1 is a CPU build" in proc.stderr
    report = json.loads(out.read_text())
    assert report["driver"]["cuda"] == "12.2" and report["driver"]["version"] == "535.104.05"
    [gpu] = report["gpus"]
    assert set(gpu) == FIXED["gpu"]
    assert (gpu["index"], gpu["capability"], gpu["memory_bytes"], gpu["supported"]) == (0, "9.0", 85520809984, False)


def test_doctor_judges_a_capability_it_does_not_have(tmp_path):
    proc = run_cli(["doctor", "--capability", "8.0", "--json", str(tmp_path / "d.json")])
    assert proc.returncode == 1 and "a GPU of compute capability 8.0 (sm_80): mxnet 1.9.1 is a CPU build" in proc.stderr
    assert json.loads((tmp_path / "d.json").read_text())["capability"]["supported"] is False
    bad = run_cli(["doctor", "--capability", "nine"])
    assert bad.returncode == 2 and "distft: error: --capability: 'nine'" in bad.stderr


# --- train / check on a GPU the wheel cannot run ---------------------------------------------------


@pytest.fixture
def gpu_build_on(monkeypatch):
    """This process sees `gpu` and has the GPU wheel's kernels (probe and install replaced)."""
    def use(gpu):
        monkeypatch.setattr(gpus, "probe", lambda: (gpus.Driver("/fake/libcuda.so.1", "550.54.15", "12.4"), [gpu]))
        monkeypatch.setattr(doctor, "installed_mxnet",
                            lambda: install.MxnetBuild("mxnet-cu112", "1.9.1", "/venv/mxnet/libmxnet.so", WHEEL))
    return use


@pytest.mark.parametrize("command", ["train", "check"])
def test_a_gpu_the_wheel_cannot_run_stops_the_job_before_any_collective(tmp_path, monkeypatch, capsys,
                                                                         gpu_build_on, command):
    from distft.data import check as datacheck
    from distft.train import run

    gpu_build_on(H100)
    started = []
    monkeypatch.setattr(run, "init_world", lambda **kw: started.append("world"))
    monkeypatch.setattr(datacheck, "main", lambda *a, **kw: started.append("check"))
    cfg = write_config(tmp_path / "job.yaml", small_config(tmp_path, str(tmp_path / "none.params")))
    assert cli.main([command, "--config", cfg]) == 2
    assert started == []
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("distft: error: GPU 0 (NVIDIA H100 80GB HBM3) of compute capability 9.0 (sm_90) cannot "
                             "run mxnet-cu112 1.9.1: its libmxnet.so has kernels for sm_50, sm_60, sm_70, sm_80, "
                             "sm_86 and no PTX")
    assert err[0].endswith("fix: build MXNet from source with CUDA >= 11.8 and MXNET_CUDA_ARCH including 9.0 (+PTX)")


def test_a_gpu_the_wheel_runs_on_is_not_stopped(gpu_build_on):
    gpu_build_on(A100)
    doctor.require_supported_gpus()


def test_the_gate_costs_nothing_without_a_gpu(monkeypatch):
    monkeypatch.setattr(gpus, "probe", lambda: (None, []))
    monkeypatch.setattr(doctor, "installed_mxnet", lambda: pytest.fail("no GPU: libmxnet.so is not read"))
    doctor.require_supported_gpus()


def test_the_cli_lists_doctor():
    proc = subprocess.run([sys.executable, "-m", "distft", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert "distft doctor --capability 9.0" in proc.stdout
