"""`distft doctor`: what is installed, read from the files (wheel metadata, libmxnet.so's needed
libraries and GPU kernels, Horovod's library), the driver and GPUs when there are any, and
whether MXNet's kernels run on each GPU, or on a GPU of a given compute capability.

Nothing here imports MXNet or Horovod: on a machine with no driver, where `import mxnet` of a GPU
build fails, every file field is still filled in. The same verdict stops `distft train` and
`distft check` before any collective when a visible GPU cannot run the kernels (exit 2)."""
from __future__ import annotations

import json
import re
import sys
from typing import Optional

from distft.errors import DistftError
from distft.gpu import elffile, gpus
from distft.gpu.install import INSTALL_GPU, MxnetBuild, Resolver, installed_mxnet, read_horovod, read_mxnet

# the first CUDA release that compiles for an architecture (nvcc --list-gpu-arch)
FIRST_CUDA = {120: "12.8", 100: "12.8", 90: "11.8", 89: "11.8", 87: "11.4", 86: "11.1", 80: "11.0"}


class GpuUnsupported(DistftError):
    """A visible GPU cannot run the installed MXNet's kernels: stop before the first kernel."""


class DamagedInstall(DistftError):
    """An installed library cannot be read: distft cannot run here (the doctor's exit 1)."""

    exit_code = 1


# --- judging a GPU ------------------------------------------------------------------------------


def parse_capability(text: str) -> tuple:
    found = re.fullmatch(r"\s*(\d+)\.(\d)\s*", str(text))
    if not found:
        raise ValueError(f"--capability: {text!r} is not a compute capability like 8.6")
    return int(found.group(1)), int(found.group(2))


def _number(arch: str) -> int:
    return int(re.sub(r"\D", "", arch))


def runs_on(kernels: elffile.Kernels, capability: tuple):
    """(True, how) when code in `kernels` loads on a GPU of `capability`, else (False, why).

    SASS for sm_XY runs on compute capability X.Z for Z >= Y (same major); PTX for compute_AB is
    compiled by the driver for any GPU of capability >= A.B."""
    major, minor = capability
    target = major * 10 + minor
    sass = [a for a in kernels.sass if _number(a) // 10 == major and _number(a) % 10 <= minor]
    if sass:
        best = max(sass, key=_number)
        same = _number(best) == target
        return True, f"{best} kernels" + ("" if same else f" (binary compatible with {major}.{minor})")
    ptx = [a for a in kernels.ptx if _number(a) <= target]
    if ptx:
        best = max(ptx, key=_number)
        return True, f"PTX {best}, compiled by the driver at the first start (slow once, then cached)"
    return False, f"no kernel for sm_{target}"


def fix_for(capability: tuple) -> str:
    target = capability[0] * 10 + capability[1]
    arch = f"{capability[0]}.{capability[1]}"
    if target < 50:
        return f"build MXNet from source with CUDA 11.x (sm_{target} was dropped in CUDA 12) and MXNET_CUDA_ARCH including {arch}"
    first = next((cuda for arch, cuda in FIRST_CUDA.items() if target >= arch), "11.2")
    return f"build MXNet from source with CUDA >= {first} and MXNET_CUDA_ARCH including {arch} (+PTX)"


def _kernel_list(kernels: elffile.Kernels) -> str:
    sass = ", ".join(kernels.sass) if kernels.sass else "no SASS"
    ptx = ("PTX " + ", ".join(kernels.ptx)) if kernels.ptx else "no PTX"
    return f"{sass} and {ptx}"


def verdict(who: str, capability: tuple, mx: "MxnetBuild", horovod_kernels=None):
    """(supported, reason, line): line is the one-line message when unsupported, else None."""
    target = f"sm_{capability[0]}{capability[1]}"
    head = f"{who} of compute capability {capability[0]}.{capability[1]} ({target})"
    if not mx.is_gpu_build:
        reason = f"{mx.distribution} {mx.version} is a CPU build: it has no GPU kernels"
        return False, reason, f"{head}: {reason}; fix: install the GPU build ({INSTALL_GPU})"
    ok, how = runs_on(mx.kernels, capability)
    if not ok:
        reason = f"libmxnet.so has kernels for {_kernel_list(mx.kernels)}: none loads on {target}"
        return False, reason, (f"{head} cannot run {mx.distribution} {mx.version}: its {reason} (the first kernel "
                               f"would fail with \"no kernel image is available\"); fix: {fix_for(capability)}")
    if horovod_kernels is not None and (horovod_kernels.sass or horovod_kernels.ptx):
        hvd_ok, _ = runs_on(horovod_kernels, capability)
        if not hvd_ok:
            reason = f"Horovod's kernels are for {_kernel_list(horovod_kernels)}: none loads on {target}"
            return False, reason, (f"{head}: MXNet runs there but {reason}; fix: rebuild Horovod with "
                                   f"HOROVOD_BUILD_CUDA_CC_LIST including {capability[0]}{capability[1]}")
    return True, f"MXNet: {how}", None


def report(capability: Optional[tuple] = None, probe=None, files_only: bool = False) -> dict:
    """Everything the doctor knows, with "ok" and "problems". `capability` judges a GPU of that
    compute capability instead of this machine's; `files_only` skips the driver and GPUs."""
    resolver = Resolver()
    mx = installed_mxnet()
    try:
        mx_section, problems = read_mxnet(mx, resolver)
        hvd_section, hvd_kernels, hvd_problems = read_horovod(mx, resolver)
    except elffile.ElfError as exc:  # a damaged install: say which file, no traceback
        raise DamagedInstall(f"{exc}; fix: reinstall (bash launch/install.sh)") from None
    problems += hvd_problems
    result = {"mxnet": mx_section, "horovod": hvd_section, "driver": None, "gpus": []}
    gpu_lines = []
    if not files_only:
        driver, visible = (probe or gpus.probe)()
        result["driver"] = driver.to_json() if driver else None
        for gpu in visible:
            ok, reason, line = verdict(gpu.label, gpu.capability, mx, hvd_kernels) if mx.installed else \
                (False, "mxnet is not installed", None)
            result["gpus"].append({"index": gpu.index, "name": gpu.name,
                                   "capability": f"{gpu.capability[0]}.{gpu.capability[1]}",
                                   "memory_bytes": gpu.memory_bytes, "supported": ok, "reason": reason})
            if line and capability is None:
                gpu_lines.append(line)
        if capability is not None and mx.installed:
            ok, reason, line = verdict("a GPU", capability, mx, hvd_kernels)
            result["capability"] = {"capability": f"{capability[0]}.{capability[1]}", "supported": ok,
                                    "reason": reason}
            if line:
                gpu_lines.append(line)
    result["problems"] = problems + gpu_lines
    result["ok"] = not result["problems"]
    return result


def summary(result: dict, files_only: bool = False) -> list:
    """The human lines of a report."""
    mx, hvd = result["mxnet"], result["horovod"]
    lines = []
    if mx["library"]:
        libs = [f"{key} {entry['needs']} <- {entry['provided_by'] or entry['path'] or 'MISSING'}"
                for key in ("cuda", "cudnn", "nccl") if (entry := mx[key])]
        lines.append(f"mxnet {mx['version']} ({mx['distribution']}): {mx['library']}")
        if libs:
            lines.append("  " + "; ".join(libs))
        k = mx["kernels"]
        lines.append(f"  kernels read from libmxnet.so: SASS {', '.join(k['sass']) or 'none'}; "
                     f"PTX {', '.join(k['ptx']) or 'none'}")
    if hvd["library"]:
        def yes(v):
            return {True: "yes", False: "no", None: "unknown"}[v]
        nccl = f" ({hvd['nccl_version']})" if hvd.get("nccl_version") else ""
        lines.append(f"horovod {hvd['version']}: MPI {yes(hvd['mpi'])}, Gloo {yes(hvd['gloo'])}, "
                     f"NCCL {yes(hvd['nccl'])}{nccl}")
    if not files_only:
        driver = result["driver"]
        if driver is None:
            lines.append("driver: none (no libcuda.so.1 here)")
        else:
            lines.append(f"driver: {driver['library']} (version {driver['version'] or 'unknown'}, CUDA "
                         f"{driver['cuda'] or 'unknown'})" + (f": {driver['error']}" if driver["error"] else ""))
        for gpu in result["gpus"]:
            mem = f"{gpu['memory_bytes'] / 2**30:.0f} GiB" if gpu["memory_bytes"] else "memory unknown"
            lines.append(f"GPU {gpu['index']}: {gpu['name']}, compute capability {gpu['capability']}, {mem}: "
                         f"{'supported' if gpu['supported'] else 'NOT supported'} ({gpu['reason']})")
    if "capability" in result:
        c = result["capability"]
        lines.append(f"compute capability {c['capability']}: {'supported' if c['supported'] else 'NOT supported'} "
                     f"({c['reason']})")
    return lines


def main(json_path: Optional[str] = None, capability: Optional[str] = None, install_check: bool = False,
         probe=None, out=sys.stdout) -> int:
    """Exit 0: this machine (or a GPU of `capability`) can run distft; 1: it cannot, with one line
    per reason. The JSON is written whatever the verdict."""
    cap = parse_capability(capability) if capability is not None else None
    result = report(cap, probe, files_only=install_check)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(result, fh, indent=1)
    for line in summary(result, files_only=install_check):
        print(line, file=out)
    if result["ok"]:
        if install_check:
            print("ok: the installed files are consistent", file=out)
        elif cap is not None:
            print(f"ok: a GPU of compute capability {cap[0]}.{cap[1]} can run distft", file=out)
        elif not result["gpus"]:
            print("ok: the installed files are consistent; no GPU is visible here", file=out)
        else:
            print("ok: every visible GPU can run distft", file=out)
        return 0
    for line in result["problems"]:
        print(line, file=sys.stderr)
    return 1


def require_supported_gpus(probe=None) -> None:
    """Before anything collective (train, check): raise GpuUnsupported with the doctor's line when
    a GPU this process can see cannot run the installed MXNet's kernels. A CPU build of MXNet
    trains on the CPU whatever GPUs there are, so it is not stopped."""
    _driver, visible = (probe or gpus.probe)()
    if not visible:
        return
    mx = installed_mxnet()
    if not mx.installed or not mx.is_gpu_build:
        return
    for gpu in visible:
        ok, _reason, line = verdict(gpu.label, gpu.capability, mx)
        if not ok:
            raise GpuUnsupported(line)
