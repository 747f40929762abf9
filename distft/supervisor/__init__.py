"""The supervisor behind launch/launch.sh (`python -m distft.launcher`): it runs horovodrun,
passes a stop request and the job's exit status through, and with `--max-restarts N` relaunches
the job from its last checkpoint on the hosts that are left.

- `hosts`: where the ranks may run (hostfile, discovery script, probes, the blacklist).
- `policy`: what to do after a launch ends (failure classes, budget, backoff, world size).
- `launch`: one launch of horovodrun, in its own process group.
- `loop`: the supervisor itself, which ties them together.

Standard library only (an import-linter contract): it runs before, and beside, any rank.
"""
