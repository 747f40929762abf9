#!/usr/bin/env bash
# Idempotent set-up of distft on a Debian machine: system packages, a virtualenv, the package
# with its MXNet flavour, and Horovod 0.28.1 built against that MXNet (the built wheel is cached,
# so a second run takes seconds).
#
#   DISTFT_VENV   virtualenv to use (default: <repo>/.venv)
#   DISTFT_EXTRA  cpu (default) or cu112
#   DISTFT_DEV    1 (default) also installs the test tools and the test-only system services
#   DISTFT_EXPORT 1 installs the `export` extra (onnx, onnxruntime) without the dev tools
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
PY=${DISTFT_PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
VPY=$VENV/bin/python
PIP=("$VPY" -m pip --disable-pip-version-check -q)

# --- the package (re-run only when its metadata or the constraints change) ------------------
# the tests export to ONNX: a dev install has the export extra too (DISTFT_EXPORT=1 without dev)
extras=$EXTRA
if [ "$DEV" = 1 ]; then extras="$extras,dev,export"
elif [ "${DISTFT_EXPORT:-0}" = 1 ]; then extras="$extras,export"; fi
stamp_want=$(cat "$ROOT/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -c1-16)-$extras
stamp_file=$VENV/.distft-installed
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp_want" ]; then
  log "pip install -e .[$extras]"
  "${PIP[@]}" install -c "$CONSTRAINTS" --upgrade "pip<25" setuptools wheel
  "${PIP[@]}" install -c "$CONSTRAINTS" -e "$ROOT[$extras]"
  echo "$stamp_want" > "$stamp_file"
fi

# --- Horovod, built against the MXNet just installed ----------------------------------------
if ! "$VPY" -c "import horovod.mxnet" 2>/dev/null; then
  mx_dist=mxnet; [ "$EXTRA" = cu112 ] && mx_dist=mxnet-cu112
  mx_version=$("$VPY" -c "import importlib.metadata as m; print(m.version('$mx_dist'))")
  wheel_dir=$CACHE/wheels/horovod-$HOROVOD_VERSION-$mx_dist-$mx_version-$(uname -m)
  if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    log "building horovod $HOROVOD_VERSION against $mx_dist $mx_version (a few minutes, once)"
    mkdir -p "$wheel_dir"
    # Horovod's build imports mxnet, cloudpickle etc.: no build isolation, so it sees this venv.
    "${PIP[@]}" install -c "$CONSTRAINTS" cloudpickle psutil packaging pyyaml
    gpu_flags=()
    [ "$EXTRA" = cu112 ] && gpu_flags=(HOROVOD_GPU_OPERATIONS=NCCL)
    env HOROVOD_WITH_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
        HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 \
        MAKEFLAGS="-j$(nproc)" "${gpu_flags[@]}" \
      "$VPY" -m pip --disable-pip-version-check wheel --no-build-isolation --no-deps \
        -c "$CONSTRAINTS" -w "$wheel_dir" "horovod==$HOROVOD_VERSION" \
        > "$wheel_dir/build.log" 2>&1 \
      || { tail -40 "$wheel_dir/build.log" >&2; rm -f "$wheel_dir"/*.whl; exit 1; }
  fi
  log "installing cached $(ls "$wheel_dir"/horovod-*.whl)"
  "${PIP[@]}" install -c "$CONSTRAINTS" "$wheel_dir"/horovod-*.whl
  "$VPY" -c "import horovod.mxnet" \
    || { echo "horovod.mxnet does not import after install" >&2; exit 1; }
fi
log "ready: $VENV ($EXTRA)"
