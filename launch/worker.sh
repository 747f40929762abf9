#!/usr/bin/env bash
# PID 1 of an MPIJob worker pod: an sshd run as the pod's own user, which the launcher's
# horovodrun (or mpirun) reaches over ssh to start this pod's ranks.
#   sshd_config  launch/ssh/sshd_config (port 2222, public keys only)
#   host key     made at start in $DISTFT_SSHD_DIR (default /tmp/distft-sshd): the image is
#                read-only to a non-root user, and a pod is a new host anyway
#   client keys  the MPI Operator mounts them at spec.sshAuthMountPath (= this user's ~/.ssh)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dir=${DISTFT_SSHD_DIR:-/tmp/distft-sshd}
mkdir -p "$dir"
chmod 700 "$dir"
[ -f "$dir/host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$dir/host_ed25519_key"
exec /usr/sbin/sshd -D -e -f "$HERE/ssh/sshd_config" \
  -o "HostKey=$dir/host_ed25519_key" -o "PidFile=$dir/sshd.pid" "$@"
