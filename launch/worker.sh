#!/usr/bin/env bash
# PID 1 of an MPIJob worker pod: an sshd run as the pod's own user, which the launcher's
# horovodrun (or mpirun) reaches over ssh to start this pod's ranks.
#   sshd_config  launch/ssh/sshd_config (port 2222, public keys only)
#   host key     made at start in $DISTFT_SSHD_DIR (default /tmp/distft-sshd): the image is
#                read-only to a non-root user, and a pod is a new host anyway
#   client keys  the MPI Operator mounts them at spec.sshAuthMountPath (= this user's ~/.ssh)
# SIGTERM (the pod is evicted or deleted) reaches only PID 1, never the ranks sshd started. So
# it becomes a stop request: "*" in $DISTFT_STOP_FILE (default /tmp/distft.stop), which this
# pod's ranks read at their next step. Every rank then agrees to stop, checkpoints and exits
# 75; once the ranks' ssh sessions have ended, sshd stops and so does the pod.
# Extra arguments go to sshd (e.g. -o Port=N).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${DISTFT_SSHD_DIR:-/tmp/distft-sshd}
stop_file=${DISTFT_STOP_FILE:-/tmp/distft.stop}
mkdir -p "$dir"
chmod 700 "$dir"
[ -f "$dir/host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$dir/host_ed25519_key"
rm -f "$stop_file"  # a request is for the ranks of this pod's life, not a later one's

/usr/sbin/sshd -D -e -f "$HERE/ssh/sshd_config" \
  -o "HostKey=$dir/host_ed25519_key" -o "PidFile=$dir/sshd.pid" "$@" &
sshd=$!

stop() {
  echo "[worker] SIGTERM: stop requested for this pod's ranks ($stop_file)" >&2
  printf '*' > "$stop_file.tmp" && mv "$stop_file.tmp" "$stop_file"
  # sshd's children are the ssh sessions, one per rank started here: wait for them to end
  # (read from /proc: slim images have no pgrep)
  while [ -n "$(cat /proc/"$sshd"/task/*/children 2> /dev/null | tr -d ' \n')" ]; do sleep 0.5; done
  echo "[worker] the ranks are gone: stopping sshd" >&2
  kill "$sshd" 2> /dev/null || true
  wait "$sshd" 2> /dev/null || true
  exit 0
}
trap stop TERM
wait "$sshd"
