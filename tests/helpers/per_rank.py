"""Run distft with per-rank arguments: `per_rank.py A|B -- distft args...` gives rank 0 the
first `|`-separated alternative and rank 1 the second, appended as the last argument."""
import os
import sys

choices = sys.argv[1].split("|")
rank = int(os.environ.get("HOROVOD_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
args = sys.argv[3:] + [choices[rank % len(choices)]]
os.execv(sys.executable, [sys.executable, "-m", "distft", *args])
