"""L-BFGS as a state machine, in float64, plain numpy: `point()` is where the next evaluation is
wanted, `tell(f, g)` hands it the objective and its gradient there. No loop of its own and no
closure: the caller evaluates many machines (the heads of a grid) in one pass over the data,
and the whole state is arrays and numbers (`state_dict()`), so a checkpoint taken between any
two evaluations resumes to the same iterates.

Every decision (accept a step, bracket, stop) is taken from the values `tell` receives. Given
the same values, every rank takes the same branch and holds the same bits.

Line search: strong Wolfe conditions (c1 = 1e-4, c2 = 0.9), bracketing then zooming by cubic
interpolation (Nocedal & Wright, Numerical Optimization, algorithms 3.5 and 3.6). Near the
optimum the objective's changes sink below its rounding, and sufficient decrease can no longer
be told from noise: a trial whose objective is within NOISE (relative) of the start and whose
slope meets the curvature condition is accepted too (Hager & Zhang's approximate Wolfe
conditions), so that the gradient can still reach `tol`. The first
trial step of each iteration is 1 (1 / ||g|| on the very first); the memory holds the last
`history` pairs (scipy and scikit-learn keep 10; more pairs, fewer passes over the data on the
ill-conditioned problems a weakly regularised probe makes), the initial inverse Hessian scaled
by s'y / y'y. The inverse Hessian is applied in its compact form (Byrd, Nocedal & Schnabel
1994; N&W eq. 7.24): four matrix-vector products with the pairs and a small solve, instead of
the two-loop recursion's 4 x history vector operations.
"""
from __future__ import annotations

import numpy as np

C1, C2 = 1e-4, 0.9  # sufficient decrease, curvature
MAX_TRIALS = 25  # evaluations one line search may take
EXTRAPOLATE = 4.0  # bracketing: the next trial step is this many times the last
NOISE = 1e-10  # the objective's changes below this (relative) are not told apart from rounding

# status
RUNNING = "running"
CONVERGED = "converged"  # gradient norm <= tol
NO_PROGRESS = "no_progress"  # an accepted step no longer moves the point (float64's resolution)
LINE_SEARCH_FAILED = "line_search_failed"  # no step along steepest descent satisfied the conditions
NOT_FINITE = "not_finite"  # the objective or its gradient is NaN/Inf at the starting point

_SCALARS = ("f", "gd0", "t", "t_prev", "f_prev", "gd_prev", "t_lo", "f_lo", "gd_lo", "t_hi", "f_hi",
            "gd_hi", "trials", "iterations", "evaluations")
_ARRAYS = ("x", "g", "d", "g_prev", "g_lo")


class Memory:
    """The last `capacity` pairs (s, y) in a ring of rows (no copy per iteration), with S'Y and
    Y'Y in time order (oldest first), kept as they were computed: a restored memory, rows in
    the same slots, gives the same bits."""

    def __init__(self, capacity: int, size: int):
        self.capacity, self.size = capacity, size
        self.s = self.y = None  # (capacity, size), allocated with the first pair
        self.count = self.oldest = 0  # pairs held; the slot of the oldest
        self.sy, self.yy = np.zeros((0, 0)), np.zeros((0, 0))

    def __len__(self) -> int:
        return self.count

    def clear(self) -> None:
        self.count = self.oldest = 0
        self.sy, self.yy = np.zeros((0, 0)), np.zeros((0, 0))

    def _order(self) -> np.ndarray:
        """Slots in time order."""
        return (self.oldest + np.arange(self.count)) % self.capacity

    def push(self, s: np.ndarray, y: np.ndarray) -> None:
        if self.s is None:
            self.s, self.y = np.zeros((self.capacity, self.size)), np.zeros((self.capacity, self.size))
        full = self.count == self.capacity
        slot = self.oldest if full else self.count
        keep = slice(1, None) if full else slice(None)
        sy, yy = self.sy[keep, keep], self.yy[keep, keep]
        self.s[slot], self.y[slot] = s, y
        if full:
            self.oldest = (self.oldest + 1) % self.capacity
        else:
            self.count += 1
        order, k = self._order(), self.count
        rows = slice(0, k)
        s_new = (self.s[rows] @ y)[order]  # s_i . y_new
        y_new = (self.y[rows] @ y)[order]
        s_row = (self.y[rows] @ s)[order]  # s_new . y_j
        self.sy, self.yy = np.empty((k, k)), np.empty((k, k))
        self.sy[:-1, :-1], self.yy[:-1, :-1] = sy, yy
        self.sy[:, -1], self.sy[-1, :-1] = s_new, s_row[:-1]
        self.yy[:, -1], self.yy[-1, :-1] = y_new, y_new[:-1]

    def inverse_hessian_times(self, g: np.ndarray) -> np.ndarray:
        """H g, H = gamma I + [S  gamma Y] M [S'; gamma Y'] with gamma = s'y / y'y of the newest
        pair, M = [[R^-T (D + gamma Y'Y) R^-1, -R^-T], [-R^-1, 0]], R the upper triangle of S'Y
        and D its diagonal."""
        order, rows = self._order(), slice(0, self.count)
        gamma = self.sy[-1, -1] / self.yy[-1, -1]
        r = np.triu(self.sy)
        u = np.linalg.solve(r, (self.s[rows] @ g)[order])
        p = np.linalg.solve(r.T, (np.diag(np.diag(self.sy)) + gamma * self.yy) @ u - gamma * (self.y[rows] @ g)[order])
        in_slots = np.empty((2, self.count))
        in_slots[0, order], in_slots[1, order] = p, u
        return gamma * g + self.s[rows].T @ in_slots[0] - gamma * (self.y[rows].T @ in_slots[1])

    def state_dict(self) -> dict:
        rows = slice(0, self.count)
        return {"s": self.s[rows], "y": self.y[rows], "sy": self.sy, "yy": self.yy}

    def load_state_dict(self, arrays: dict, oldest: int) -> None:
        self.clear()
        if "s" not in arrays:
            return
        k = len(arrays["s"])
        self.s, self.y = np.zeros((self.capacity, self.size)), np.zeros((self.capacity, self.size))
        self.s[:k], self.y[:k] = arrays["s"], arrays["y"]
        self.count, self.oldest = k, oldest
        self.sy = np.array(arrays["sy"], dtype=np.float64).reshape(k, k)
        self.yy = np.array(arrays["yy"], dtype=np.float64).reshape(k, k)


class LBFGS:
    """`tol`: stop once `norm(gradient)` is at most this (`norm`: the Euclidean one unless the
    caller measures the gradient in other coordinates than the ones it minimises in)."""

    def __init__(self, x0: np.ndarray, tol: float, history: int = 10, norm=np.linalg.norm):
        self.tol, self.history, self.norm = float(tol), int(history), norm
        self.x = np.array(x0, dtype=np.float64).ravel()
        self.g = self.d = self.g_prev = self.g_lo = None
        self.memory = Memory(self.history, self.x.size)
        self.phase = "start"  # start (f, g at x wanted), bracket, zoom, or done
        self.status = RUNNING
        self.f = self.gd0 = self.t = self.t_prev = self.f_prev = self.gd_prev = float("nan")
        self.t_lo = self.f_lo = self.gd_lo = self.t_hi = self.f_hi = self.gd_hi = float("nan")
        self.trials = self.iterations = self.evaluations = 0

    # --- what the caller sees -------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.phase == "done"

    @property
    def gradient_norm(self) -> float:
        return float(self.norm(self.g)) if self.g is not None else float("nan")

    def point(self) -> np.ndarray:
        """Where the objective and gradient are wanted next (the solution once `done`)."""
        if self.phase in ("start", "done"):
            return self.x
        return self.x + self.t * self.d

    def tell(self, f: float, g: np.ndarray) -> None:
        """The objective and its gradient at `point()`."""
        if self.done:
            raise RuntimeError("tell() after the minimisation ended")
        self.evaluations += 1
        f, g = float(f), np.asarray(g, dtype=np.float64)
        finite = np.isfinite(f) and bool(np.isfinite(g).all())
        if self.phase == "start":
            self.f, self.g = f, g
            if not finite:
                self.status, self.phase = NOT_FINITE, "done"
            elif not self._converged():
                self._direction(steepest=True)
            return
        self.trials += 1
        if not finite:  # too far along d: the line search shrinks the step
            f, g = float("inf"), np.zeros_like(g)
        gd = float(g @ self.d)
        if self.phase == "bracket":
            self._bracket(f, g, gd)
        else:
            self._zoom(f, g, gd)
        if not self.done and self.phase != "start" and self.trials >= MAX_TRIALS:
            self._line_search_failed()

    # --- the line search ------------------------------------------------------------------------
    def _armijo_fails(self, t: float, f: float) -> bool:
        return f > self.f + C1 * t * self.gd0

    def _curvature_holds(self, gd: float) -> bool:
        return abs(gd) <= -C2 * self.gd0

    def _approximately_wolfe(self, f: float, gd: float) -> bool:
        return f <= self.f + NOISE * abs(self.f) and self._curvature_holds(gd)

    def _bracket(self, f: float, g: np.ndarray, gd: float) -> None:
        t = self.t
        if self._armijo_fails(t, f) or (self.trials > 1 and f >= self.f_prev):
            if self._approximately_wolfe(f, gd):
                self._accept(t, f, g)
            else:
                self._start_zoom((self.t_prev, self.f_prev, self.gd_prev, self.g_prev), (t, f, gd))
        elif self._curvature_holds(gd):
            self._accept(t, f, g)
        elif gd >= 0:
            self._start_zoom((t, f, gd, g), (self.t_prev, self.f_prev, self.gd_prev))
        else:
            self.t_prev, self.f_prev, self.gd_prev, self.g_prev = t, f, gd, g
            self.t = t * EXTRAPOLATE

    def _start_zoom(self, lo: tuple, hi: tuple) -> None:
        (self.t_lo, self.f_lo, self.gd_lo, self.g_lo), (self.t_hi, self.f_hi, self.gd_hi) = lo, hi
        self.phase = "zoom"
        self.t = self._interpolate()

    def _zoom(self, f: float, g: np.ndarray, gd: float) -> None:
        t = self.t
        if self._armijo_fails(t, f) or f >= self.f_lo:
            if self._approximately_wolfe(f, gd):
                self._accept(t, f, g)
                return
            self.t_hi, self.f_hi, self.gd_hi = t, f, gd
        else:
            if self._curvature_holds(gd):
                self._accept(t, f, g)
                return
            if gd * (self.t_hi - self.t_lo) >= 0:
                self.t_hi, self.f_hi, self.gd_hi = self.t_lo, self.f_lo, self.gd_lo
            self.t_lo, self.f_lo, self.gd_lo, self.g_lo = t, f, gd, g
        if abs(self.t_hi - self.t_lo) <= 1e-14 * max(abs(self.t_lo), abs(self.t_hi)):
            self._line_search_failed()
            return
        self.t = self._interpolate()

    def _interpolate(self) -> float:
        """The minimiser of the cubic through (t, f, f') at both ends of the bracket, kept at
        least a tenth of the bracket away from either end (else its middle)."""
        a, fa, ga, b, fb, gb = self.t_lo, self.f_lo, self.gd_lo, self.t_hi, self.f_hi, self.gd_hi
        lo, hi = min(a, b), max(a, b)
        margin = 0.1 * (hi - lo)
        d1 = ga + gb - 3 * (fa - fb) / (a - b)
        disc = d1 * d1 - ga * gb
        if disc >= 0 and np.isfinite(disc):
            d2 = np.copysign(np.sqrt(disc), b - a)
            denom = gb - ga + 2 * d2
            if denom != 0:
                t = b - (b - a) * (gb + d2 - d1) / denom
                if lo + margin <= t <= hi - margin:
                    return float(t)
        return 0.5 * (lo + hi)

    def _line_search_failed(self) -> None:
        """Take the best point the search found if it decreased the objective; else start again
        along steepest descent; stop when steepest descent failed too."""
        if self.phase == "zoom" and self.t_lo > 0 and self.f_lo < self.f:
            self._accept(self.t_lo, self.f_lo, self.g_lo)
        elif len(self.memory):
            self.memory.clear()
            self._direction(steepest=True)
        else:
            self.status, self.phase = LINE_SEARCH_FAILED, "done"

    # --- iterations -----------------------------------------------------------------------------
    def _accept(self, t: float, f: float, g: np.ndarray) -> None:
        step, change = t * self.d, g - self.g
        self.x = self.x + step
        sy = float(step @ change)
        if sy > 1e-10 * float(change @ change):  # positive curvature: a usable pair
            self.memory.push(step, change)
        self.f, self.g = f, g
        self.iterations += 1
        if self._converged():
            return
        if np.abs(step).max() <= 4 * np.finfo(np.float64).eps * np.abs(self.x).max():
            self.status, self.phase = NO_PROGRESS, "done"
            return
        self._direction(steepest=False)

    def _converged(self) -> bool:
        if self.gradient_norm <= self.tol:
            self.status, self.phase = CONVERGED, "done"
            return True
        return False

    def _direction(self, steepest: bool) -> None:
        """The next search direction (two-loop recursion over the memory) and the line
        search's first trial step."""
        d = -self.g if steepest or not len(self.memory) else -self.memory.inverse_hessian_times(self.g)
        gd = float(self.g @ d)
        if gd >= 0:  # not a descent direction (rounding): forget the memory
            self.memory.clear()
            d, gd = -self.g, -float(self.g @ self.g)
        self.d, self.gd0 = d, gd
        self.t = min(1.0, 1.0 / float(np.linalg.norm(self.g))) if not len(self.memory) else 1.0
        self.t_prev, self.f_prev, self.gd_prev, self.g_prev = 0.0, self.f, gd, self.g
        self.trials, self.phase = 0, "bracket"

    # --- state ----------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict, dict]:
        """(arrays, numbers): everything the machine carries between two evaluations."""
        arrays = {k: getattr(self, k) for k in _ARRAYS if getattr(self, k) is not None}
        if len(self.memory):
            arrays.update(self.memory.state_dict())
        numbers = {k: float(getattr(self, k)) for k in _SCALARS}
        numbers.update(phase=self.phase, status=self.status, tol=self.tol, history=self.history,
                       oldest=self.memory.oldest, shapes={k: list(v.shape) for k, v in arrays.items()})
        return arrays, numbers

    def load_state_dict(self, arrays: dict, numbers: dict) -> None:
        for k in _SCALARS:
            value = float(numbers[k])
            setattr(self, k, int(value) if k in ("trials", "iterations", "evaluations") else value)
        self.phase, self.status = numbers["phase"], numbers["status"]
        for k in _ARRAYS:
            setattr(self, k, np.array(arrays[k], dtype=np.float64) if k in arrays else None)
        self.memory.load_state_dict(arrays, int(numbers["oldest"]))
