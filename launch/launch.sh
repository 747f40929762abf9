#!/usr/bin/env bash
# Start distft on every slot of a multi-node allocation with horovodrun.
#   hosts:  $DISTFT_HOSTFILE (the MPI Operator mounts /etc/mpi/hostfile), else the Slurm
#           allocation (SLURM_JOB_NODELIST), else this machine with $DISTFT_NP ranks (default 1)
#   DISTFT_CONTROLLER  mpi (default: synchronized BatchNorm exchanges its statistics through MPI,
#                      measured faster than through Horovod's queue under Gloo) or gloo
#   DISTFT_IFACE       network interface for Horovod and NCCL (e.g. eth0, ib0)
#   DISTFT_SSH_PORT    the workers' sshd port (MPIJob workers: 2222, launch/worker.sh)
# Tuning defaults (override by exporting them): NCCL_DEBUG=WARN. distft's own choices unless
# exported (distft/distributed/world.py): HOROVOD_CYCLE_TIME (how often Horovod batches ready
# tensors) 1 ms where synchronized BatchNorm statistics go through Horovod's queue (Gloo,
# dist.bn_channel: horovod, MPI without THREAD_MULTIPLE), else 5 ms; HOROVOD_FUSION_THRESHOLD
# 8 MiB (distft buckets the gradients itself); OMPI_MCA_mpi_yield_when_idle=1 (Open MPI yields
# the core while waiting); MXNET_CPU_TEMP_COPY one MXNet CPU workspace per worker thread
# (distft/allocator.py). Arguments go to distft (e.g. --config X --set k=v).
#   DISTFT_RUNNER      horovodrun (default), or srun inside a Slurm job: one rank per task
# Exit status: the ranks' (0 done, 75 stopped and resumable, 2 user error, ...), not horovodrun's.
# SIGTERM or SIGINT: the ranks checkpoint at the next step and exit 75 (see distft/supervisor/).
# --max-restarts N [--min-np N --max-np N --host-discovery-script S --wait-hosts SECONDS], among
# the arguments or as DISTFT_MAX_RESTARTS etc.: relaunch the job from its last checkpoint on the
# hosts that are left after a lost rank or node (docs/launching.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
HERE="$DISTFT_ROOT/launch"

export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
extra=()
if [ -n "${DISTFT_IFACE:-}" ]; then
  export NCCL_SOCKET_IFNAME=$DISTFT_IFACE GLOO_SOCKET_IFNAME=$DISTFT_IFACE
  extra+=(--network-interface "$DISTFT_IFACE")
fi
if [ -n "${DISTFT_SSH_PORT:-}" ]; then
  extra+=(--ssh-port "$DISTFT_SSH_PORT")
fi

if [ "${DISTFT_RUNNER:-horovodrun}" = srun ]; then
  # inside a Slurm job (launch/slurm/distft.sbatch): Slurm starts one rank per task on every node
  # and signals and kills them itself; MPI (PMIx) wires them up, so no horovodrun and no ssh
  if [ -n "${DISTFT_IFACE:-}" ]; then
    export OMPI_MCA_btl_tcp_if_include=$DISTFT_IFACE OMPI_MCA_oob_tcp_if_include=$DISTFT_IFACE
  fi
  echo "[launch] srun --mpi=${DISTFT_SRUN_MPI:-pmix} ($SLURM_NTASKS tasks on $SLURM_JOB_NODELIST)" >&2
  exec srun --mpi="${DISTFT_SRUN_MPI:-pmix}" python -m distft "$@"
fi

# distft.launcher (distft/supervisor/) runs horovodrun: SIGTERM or SIGINT here becomes a stop
# request to one rank (horovodrun would SIGKILL its ranks 5 s after passing it on), the ranks'
# exit code (75: stopped, resumable; 2: user error) becomes ours (horovodrun --gloo's own is 1
# for any failure; --mpi passes mpirun's through), and with --max-restarts N it relaunches the
# job from its last checkpoint on the hosts that are left. A hostfile is read again before each
# launch; it prints "[launch] horovodrun -np N -H hosts" for each.
if [ -n "${DISTFT_HOSTFILE:-}" ]; then
  hosts=(--hostfile "$DISTFT_HOSTFILE" --slots "${DISTFT_SLOTS:-1}" horovodrun)
elif [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  # shellcheck disable=SC2207  # "-np N -H list", split on purpose
  hosts=(horovodrun $(python3 "$HERE/hosts.py" --slurm))
else
  hosts=(horovodrun -np "${DISTFT_NP:-1}" -H "localhost:${DISTFT_NP:-1}")
fi
exec python -m distft.launcher "${hosts[@]}" "--${DISTFT_CONTROLLER:-mpi}" "${extra[@]}" python -m distft "$@"
