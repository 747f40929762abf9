"""What a launcher tells the processes it starts: the variables horovodrun, mpirun and srun set
in every rank, and distft's own stop file, through which `distft.launcher` (launch/launch.sh)
asks the ranks to stop at the next step. Standard library only: the launcher imports it."""
from __future__ import annotations

import base64
import json
import os
from typing import Optional

from distft.files import atomic_write

# a rank's number, as each launcher names it: horovodrun, Open MPI's mpirun, MPICH/PMI (and
# srun --mpi=pmi2), PMIx (srun --mpi=pmix, Open MPI 5), Slurm's srun. Every launcher that sets
# one of the first four starts ranks of one job; SLURM_PROCID is also set in a batch script's
# single task, so it counts only with SLURM_NTASKS > 1 there.
RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")

STOP_FILE_ENV, LAUNCH_ID_ENV = "DISTFT_STOP_FILE", "DISTFT_LAUNCH_ID"
DEFAULT_STOP_FILE = "/tmp/distft.stop"
ANY_LAUNCH = "*"  # written by a worker pod's entry point, which does not know the launch id


def under_launcher(env=os.environ) -> bool:
    """Whether a launcher started this process (Open MPI gives every rank a pseudo-terminal even
    when the output goes to a file: a terminal alone does not say a person is watching)."""
    return any(var in env for var in RANK_VARIABLES)


def started_ranks(env=os.environ) -> bool:
    """True when a launcher started several ranks (horovodrun, mpirun, srun)."""
    if any(var in env for var in RANK_VARIABLES if var != "SLURM_PROCID"):
        return True
    return int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env


def launcher_rank(env=os.environ) -> str:
    """This process's rank as its launcher numbered it ("" without a launcher)."""
    for var in RANK_VARIABLES:
        if var in env:
            return env[var]
    return ""


def write_stop_file(path: str, launch_id: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(launch_id)

    atomic_write(path, write)


def stop_file_says_stop(path: str, launch_id: Optional[str]) -> bool:
    """What a rank checks each step."""
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return False
    return text == ANY_LAUNCH or (launch_id is not None and text == launch_id)


# what a rank prints when Horovod shut down under it because a peer failed, was killed or stalled
# (cli.py, exit 3 as ranks that disagree): the supervisor tells the two apart by it
PEER_LOST = "Horovod shut down: another rank failed, was killed or stalled"


# the supervisor's word to a relaunched job (launch.sh --max-restarts): why it was relaunched,
# where, and how many relaunches of each reason so far. base64url of JSON: it passes through
# horovodrun's and mpirun's environment forwarding and ssh unquoted.
RESTART_ENV = "DISTFT_RESTART"


def encode_restart(record: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(record, sort_keys=True).encode()).decode()


def restart_record(env=os.environ) -> Optional[dict]:
    """{n, reason, hosts, world_size, counts, since} when the supervisor relaunched this job, else None
    (since: the wall time of its first launch)."""
    text = env.get(RESTART_ENV)
    if not text:
        return None
    try:
        return json.loads(base64.urlsafe_b64decode(text.encode()))
    except ValueError:
        return None
