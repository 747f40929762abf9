#!/usr/bin/env bash
# Idempotent set-up of distft on a Debian machine: system packages, a virtualenv, the package
# with its MXNet flavour, and Horovod 0.28.1 built against that MXNet (the built wheel is cached,
# so a second run takes seconds).
#
#   DISTFT_VENV   virtualenv to use (default: <repo>/.venv)
#   DISTFT_EXTRA  cpu (default) or cu112: mxnet-cu112 with the CUDA 11 libraries from the registry
#                 (found at run time by distft/gpu/cudalibs.py) and Horovod built with NCCL by a CUDA
#                 11.8 toolchain (launch/cuda-toolkit.sh); works on a machine with no GPU or driver
#   DISTFT_DEV    1 (default) also installs the test tools and the test-only system services
#   DISTFT_EXPORT 1 installs the `export` extra (onnx, onnxruntime) without the dev tools
#   DISTFT_TEST   1 installs pytest without the dev tools (launch/gpu-smoke.sh)
#   DISTFT_CACHE  where built wheels are kept (default: ~/.cache/distft)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${DISTFT_VENV:-$ROOT/.venv}
EXTRA=${DISTFT_EXTRA:-cpu}
DEV=${DISTFT_DEV:-1}
CACHE=${DISTFT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/distft}
CONSTRAINTS=$ROOT/launch/constraints.txt
HOROVOD_VERSION=0.28.1

log() { printf '[install] %s\n' "$*" >&2; }

case "$EXTRA" in
  cpu|cu112) ;;
  *) echo "DISTFT_EXTRA must be 'cpu' or 'cu112', got '$EXTRA'" >&2; exit 2 ;;
esac

# --- system packages pip cannot provide -----------------------------------------------------
# Debian's cmake (3.25): pip's cmake 4.x rejects Gloo's CMakeLists.
APT_PACKAGES=(libopenmpi-dev openmpi-bin openssh-client cmake g++ make)
# Debian's Python makes the venv when the first python3.11 on PATH is closed to other users
[ -z "${DISTFT_PYTHON:-}" ] && [ -x /usr/bin/python3.11 ] && APT_PACKAGES+=(python3.11-venv)
# cu112: nvcc 11.8 compiles Horovod's kernels with GCC 11 at the newest
[ "$EXTRA" = cu112 ] && [ -z "${HOROVOD_CUDA_HOME:-}" ] && APT_PACKAGES+=(g++-11)
if [ "$DEV" = 1 ]; then
  # the tests run a real Prometheus server, promtool, a Pushgateway, a single-node Slurm, and
  # a cluster of network namespaces (ip netns) with an sshd in each
  APT_PACKAGES+=(prometheus prometheus-pushgateway slurm-wlm munge openssh-server iproute2)
fi
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- virtualenv -----------------------------------------------------------------------------
# The interpreter: $DISTFT_PYTHON, else the first python3.11 (python3) on PATH, unless a folder
# above its real file is closed to other users (pyenv's under /root, mode 700): a venv made from
# it is then unusable by any other uid (a pod's uid 1000, a colleague on shared storage), and
# Debian's /usr/bin/python3.11 is taken instead.
others_can_run() {
  "$1" -c 'import os, sys
p = os.path.realpath(sys.executable)
while p != "/":
    p = os.path.dirname(p)
    if not os.stat(p).st_mode & 0o001:
        sys.exit(1)' 2>/dev/null
}
PY=${DISTFT_PYTHON:-}
if [ -z "$PY" ]; then
  PY=$(command -v python3.11 || command -v python3)
  if ! others_can_run "$PY" && [ -x /usr/bin/python3.11 ]; then PY=/usr/bin/python3.11; fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV ($PY)"
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
PIP=("$VPY" -m pip --disable-pip-version-check -q)

# --- the package (re-run only when its metadata or the constraints change) ------------------
# the tests export to ONNX: a dev install has the export extra too (DISTFT_EXPORT=1 without dev)
extras=$EXTRA
if [ "$DEV" = 1 ]; then extras="$extras,dev,export"
elif [ "${DISTFT_EXPORT:-0}" = 1 ]; then extras="$extras,export"; fi
if [ "$DEV" != 1 ] && [ "${DISTFT_TEST:-0}" = 1 ]; then extras="$extras,test"; fi
stamp_want=$(cat "$ROOT/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -c1-16)-$extras
stamp_file=$VENV/.distft-installed
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp_want" ]; then
  log "pip install -e .[$extras]"
  "${PIP[@]}" install -c "$CONSTRAINTS" --upgrade "pip<25" setuptools wheel
  "${PIP[@]}" install -c "$CONSTRAINTS" -e "$ROOT[$extras]"
  echo "$stamp_want" > "$stamp_file"
fi
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ "$EXTRA" = cu112 ]; then
  # every interpreter of this venv finds the CUDA libraries of the nvidia-* wheels when it first
  # imports mxnet (distft/gpu/cudalibs.py): distft, Horovod's build, a user's script
  "$VPY" -c 'from distft.gpu import cudalibs; print(cudalibs.PTH_LINE, end="")' > "$SITE/distft-cuda-libs.pth"
fi

# --- Horovod, built against the MXNet just installed ----------------------------------------
# The wheel cache key is what the build used: Horovod, Python, MXNet, the controllers, and for
# cu112 the GPU operations, NCCL, the CUDA toolchain, its host compiler and the kernel
# architectures. pip's own wheel cache is bypassed (--no-cache-dir): it keys on the sdist alone,
# and handed a cu112 install the CPU build once.
dist_version() { "$VPY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }
mx_dist=mxnet; [ "$EXTRA" = cu112 ] && mx_dist=mxnet-cu112
mx_version=$(dist_version "$mx_dist")
py_tag=$("$VPY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
build_env=(HOROVOD_WITH_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
           HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 MAKEFLAGS="-j$(nproc)")
spec="horovod $HOROVOD_VERSION, $py_tag $(uname -m), $mx_dist $mx_version, controllers mpi ($(mpirun --version 2>/dev/null | sed -n 1p)) and gloo"
if [ "$EXTRA" = cu112 ]; then
  nccl_version=$(dist_version nvidia-nccl-cu11)
  # Horovod's kernels for exactly the architectures MXNet's own kernels have (read from libmxnet.so)
  cuda_archs=$("$VPY" -c 'from distft.gpu import cudalibs, elffile
print(",".join(a[3:] for a in elffile.kernels(cudalibs.mxnet_library()).sass))')
  if [ -n "${HOROVOD_CUDA_HOME:-}" ]; then
    # a CUDA toolkit of the machine's (the Docker image's), with the compilers of the environment
    cuda_home=$HOROVOD_CUDA_HOME
    cuda_desc="CUDA at $cuda_home ($("$cuda_home/bin/nvcc" --version | tail -1)) with ${CXX:-c++}"
  else
    cuda_home=$CACHE/toolchains/cuda-11.8.89-deb12u1  # launch/cuda-toolkit.sh's version
    cuda_desc="CUDA 11.8.89~11.8.0-5~deb12u1 (Debian) with g++-11"
  fi
  spec="$spec, gpu operations NCCL (nvidia-nccl-cu11 $nccl_version, shared), $cuda_desc, sm $cuda_archs"
fi
key=$(printf '%s' "$spec" | sha256sum | cut -c1-12)
wheel_dir=$CACHE/wheels/horovod-$HOROVOD_VERSION-$py_tag-$mx_dist-$mx_version-$(uname -m)-$key
# on a machine without a driver, `import mxnet` (Horovod's build and the check below run it) needs
# NVIDIA's link stub of the driver, from the toolkit, under the driver's soname
stub_env=()
if [ "$EXTRA" = cu112 ] && ! "$VPY" -c 'import ctypes; ctypes.CDLL("libcuda.so.1")' 2>/dev/null; then
  mkdir -p "$CACHE/driver-stub"
  ln -sfn "$cuda_home/lib64/stubs/libcuda.so" "$CACHE/driver-stub/libcuda.so.1"
  stub_env=(LD_LIBRARY_PATH="$CACHE/driver-stub${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
fi
# Horovod's build imports mxnet, cloudpickle etc.: no build isolation, so it sees this venv.
"${PIP[@]}" install -c "$CONSTRAINTS" cloudpickle psutil packaging pyyaml

if [ "$(cat "$VENV/.distft-horovod" 2>/dev/null)" != "$key" ]; then
  if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    log "building horovod $HOROVOD_VERSION: $spec (a few minutes, once)"
    mkdir -p "$wheel_dir"
    printf '%s\n' "$spec" > "$wheel_dir/build-spec.txt"
    if [ "$EXTRA" = cu112 ]; then
      if [ -z "${HOROVOD_CUDA_HOME:-}" ]; then
        bash "$ROOT/launch/cuda-toolkit.sh" "$cuda_home"
        build_env+=(CC=gcc-11 CXX=g++-11)  # Horovod compiles with CXX as nvcc's host compiler
      fi
      mkdir -p "$wheel_dir/link"  # the NCCL of this venv under the name the linker looks for
      ln -sf "$SITE/nvidia/nccl/lib/libnccl.so.2" "$wheel_dir/link/libnccl.so"
      build_env+=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME="$cuda_home"
                  HOROVOD_NCCL_INCLUDE="$SITE/nvidia/nccl/include" HOROVOD_NCCL_LIB="$wheel_dir/link"
                  HOROVOD_NCCL_LINK=SHARED HOROVOD_BUILD_CUDA_CC_LIST="$cuda_archs" "${stub_env[@]}")
    fi
    env "${build_env[@]}" \
      "$VPY" -m pip --disable-pip-version-check wheel --no-cache-dir --no-build-isolation --no-deps \
        -c "$CONSTRAINTS" -w "$wheel_dir" "horovod==$HOROVOD_VERSION" \
        > "$wheel_dir/build.log" 2>&1 \
      || { tail -40 "$wheel_dir/build.log" >&2; rm -f "$wheel_dir"/*.whl; exit 1; }
  fi
  log "installing cached $(ls "$wheel_dir"/horovod-*.whl)"
  "${PIP[@]}" install -c "$CONSTRAINTS" --force-reinstall --no-deps "$wheel_dir"/horovod-*.whl
  # what Horovod was built with, read from its library, and in its own words through its import
  # (skipped only without a driver and without the toolchain's stub: a wheel cached earlier)
  want="hvd.mpi_built() and hvd.gloo_built()"
  [ "$EXTRA" = cu112 ] && want="$want and hvd.nccl_built()"
  import_check=("$VPY" -c "import horovod.mxnet as hvd; assert $want, 'not built: $want'")
  if [ ${#stub_env[@]} -gt 0 ] && [ ! -e "$CACHE/driver-stub/libcuda.so.1" ]; then
    log "no driver here: Horovod's import is not tried, its library was read"
    import_check=(true)
  fi
  if ! "$VPY" -m distft doctor --install-check || ! env "${stub_env[@]}" "${import_check[@]}"; then
    echo "install.sh: the Horovod wheel in $wheel_dir does not work here; it was removed from the cache" >&2
    rm -f "$wheel_dir"/*.whl
    exit 1
  fi
  echo "$key" > "$VENV/.distft-horovod"
fi
log "ready: $VENV ($EXTRA)"
