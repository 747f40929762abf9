"""A job whose optimizer is a solve (`optimizer.name: lbfgs`, components/probe.py): its loop is
passes over the cached features, not steps over batches. Set-up, validation, checkpoints and the
end are the Job's own."""
from __future__ import annotations

import time

from distft.components.summary import Stats
from distft.console import log, warn
from distft.errors import NumericalError
from distft.train.job import Job


class SolvingJob(Job):
    def fit(self) -> dict:
        """optimizer.name: lbfgs. The features once (probe.py), then a step is one pass over
        them: every head still solving evaluated on every rank's shard, one allreduce with the
        stop ballot, every head's L-BFGS machine advanced by the agreed numbers."""
        state, stats, solver = self.state, Stats(), self.solver
        self.guard.start()
        self.started, evals = time.perf_counter(), {}
        with self.guard.together():
            solver.extract(self.network.runner, self.data.train_loader, self.guard.beat)
        log(self.world, f"lbfgs: features of {len(solver.indices)} samples on this rank in "
                        f"{solver.extract_seconds:.1f} s")
        stats.start_epoch()
        solving = time.perf_counter()
        with solver.threads():
            while state.step < self.data.total_steps and not solver.done:
                stats.begin_step()
                stop = solver.step(self.guard.stop_requested)
                state.advance()
                state.start_epoch(state.epoch + 1)  # a pass is an epoch
                stats.end_step(state.global_batch)
                self.record_pass(stats)
                self.guard.poll(state.step)
                if stop:
                    self.stop()
                if self.checkpoints.steps_due():  # a pass is an epoch of its own: steps alone decide
                    self.checkpoints.save(force=True)
                self.guard.beat()
                stats.mark()
        solver.solve_seconds = time.perf_counter() - solving  # every pass, with its metrics and checkpoints
        solver.write_weights()
        self.solve_ended()
        if self.data.val_loader is not None:
            evals = self.validate(state.epoch)
        self.checkpoints.save(force=True)
        return self.finish(stats, evals)

    def record_pass(self, stats: Stats) -> None:
        state, solver = self.state, self.solver
        loss, _, per_head = self.heads.figures(solver.losses, [0.0] * len(self.heads))
        self.metrics.step(samples=len(solver.indices), seconds=stats.last_step, data=0.0,
                          allreduce=solver.seconds_total - stats.exchange_seconds,
                          allreduce_bytes=solver.bytes_per_step, loss=loss, lr=0.0, epoch=state.epoch, heads=per_head)
        stats.exchange_seconds = solver.seconds_total
        if state.step % self.cfg.train.log_every == 0 or solver.done or state.step == self.data.total_steps:
            self.metrics.window(global_step=state.step, total_steps=self.data.total_steps, epoch=state.epoch,
                                loss=loss, lr=0.0, heads=per_head)
            if not self.metrics.shows_progress:
                head, worst = max(zip(self.heads, solver.machines),
                                  key=lambda hm: (not hm[1].done, hm[1].gradient_norm))
                which = f"{sum(not m.done for m in solver.machines)} of {len(self.heads)} heads solving, the " \
                        f"farthest {head.name}: " if self.heads.grid else ""
                log(self.world, f"pass {state.step}: {which}objective {worst.f:.4f}, gradient norm "
                                f"{worst.gradient_norm:.2e} ({worst.iterations} iterations)")

    def solve_ended(self) -> None:
        """Heads whose objective is not finite are stopped; a solve cut short by train.epochs
        (or max_steps) says so."""
        bad = self.solver.not_finite()
        for h in bad:
            h.diverged = {"step": self.state.step, "epoch": self.state.epoch, "reason": "non-finite objective"}
        if len(bad) == len(self.heads):
            raise NumericalError(f"pass {self.state.step}: the objective is not finite at the head's starting "
                                 "weights (are the frozen features finite?)")
        open_heads = [h.name for h, m in zip(self.heads, self.solver.machines) if not m.done]
        if open_heads:
            warn(self.world, f"optimizer.name: lbfgs: stopped after {self.state.step} passes (train.epochs, "
                             f"train.max_steps) before the gradient norm reached optimizer.tol "
                             f"{self.cfg.optimizer.tol:g}" + (f" for heads {', '.join(open_heads)}" if self.heads.grid
                                                              else "") + "; raise train.epochs to solve on")
