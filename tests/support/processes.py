"""Waiting for and ending the processes a test starts."""
import json
import time

import psutil


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(what)


def kill_tree(proc):
    """Kill a launcher and every process under it."""
    try:
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    proc.kill()
    proc.wait()


def logged_steps(out):
    """The steps a run's log.jsonl has logged so far (its window records)."""
    try:
        lines = [json.loads(line) for line in open(out / "log.jsonl")]
    except OSError:
        return []
    return [r["step"] for r in lines if "step" in r and "event" not in r]
