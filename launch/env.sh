# Sourced by the launch scripts: the virtualenv and the MPI settings every launch needs.
DISTFT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DISTFT_VENV=${DISTFT_VENV:-$DISTFT_ROOT/.venv}
export PATH="$DISTFT_VENV/bin:$PATH"
if [ "$(id -u)" = 0 ]; then
  # Open MPI refuses to start as root without both (containers and CI run as root)
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export PYTHONUNBUFFERED=1
