"""Levenberg-Marquardt least squares on a batch of black boxes, with Jacobians by finite differences.

For each of B problems, minimise the squared residual

    L_b(p) = || f(p; b) - x_b ||^2,    p in R^P,

where f is a black box evaluated on many inputs at once (a renderer: one call draws every perturbed and trial
pose of every scene of a batch). Each iteration (Levenberg 1944, Marquardt 1963; Nocedal & Wright, Numerical
Optimization, sec. 10.3):

1. J, the Jacobian of f at p, by forward differences, J_j = (f(p + h_j e_j) - f(p)) / h_j (P evaluations, f(p)
   is known), or central differences (2 P);
2. the damped Gauss-Newton step  (J^T J + lambda D) delta = -J^T r,  r = f(p) - x, with Marquardt's scaling
   D = diag(J^T J) (so the step does not depend on the parameters' units), shrunk if needed so that no parameter
   moves more than `max_step` of its difference step h_j (beyond that, a finite-difference model of a hard
   render is not to be trusted);
3. the step is taken only if it lowers L_b (one evaluation); then lambda shrinks, else it grows and the step is
   solved again from the same J (one more evaluation, no new Jacobian), up to `retries` times. A problem has
   converged, and costs nothing more, when its retries all fail, its damping passes `max_damping`, or a step it
   took moved no parameter more than `tolerance` of its h_j (a twentieth of a pixel with one-pixel steps).

So the loss never rises: the returned p is the best point evaluated. Problems are independent (a scene's J only
involves its own parameters), so the P x P systems are tiny and solved batched.

Optional:
- a free positive gain (an image's exposure), solved in closed form for every evaluated point,
  g = <f, x> / <f, f> over the entries where x < 1, with predictions (g f).clamp(max=1) (an image saturates at 1);
  the Jacobian is taken at the base point's g (variable projection: by the envelope theorem the gradient needs
  no term through g);
- a linear smoothing S of the outputs: steps are modelled and accepted on || S f(p) - S x ||^2 (a hard render's
  residual is piecewise constant; blurred, it is a smooth function whose one-pixel differences are slopes),
  while the point returned is the best evaluated by the unsmoothed loss;
- a projection onto the feasible set (objects kept on a table) applied to the start and to every trial;
- a `perturb` evaluator for the Jacobian's points, given the base point and its outputs (a renderer redraws only
  the pixels one object's move can change).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "LMSettings",
    "LMResult",
    "Perturb",
    "damped_step",
    "jacobian",
    "levenberg_marquardt",
    "normal_equations",
    "solve_gain",
]

BlackBox = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (params (M, P), rows (M,)) -> (M, D)
# (params (M, P), rows (M,), cols (M,), base params (M, P), base outputs (M, D)) -> outputs (M, D) at params, which
# differ from base params in entry cols only: a black box that can redraw only what that entry changes
Perturb = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Project = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (params (M, P), rows (M,)) -> feasible (M, P)
Smooth = Callable[[torch.Tensor], torch.Tensor]  # a linear map of outputs (M, D) -> (M, D')


@dataclass(frozen=True)
class LMSettings:
    """How Levenberg-Marquardt iterates (module docstring)."""

    iterations: int = 8  # at most this many Jacobians per problem (each P or 2 P evaluations)
    damping: float = 1e-2  # lambda at the start, relative to diag(J^T J): nearly a Gauss-Newton step
    damping_up: float = 10.0  # lambda times this after a step that did not lower the loss
    damping_down: float = 0.3  # lambda times this after one that did
    max_damping: float = 1e4  # a problem whose lambda passes this has converged (steps of ~1e-4 of Gauss-Newton's)
    retries: int = 2  # rejected steps re-solved with more damping from the same Jacobian, per iteration
    max_step: float = 3.0  # the largest move of parameter j in one step, in units of its difference step h_j
    tolerance: float = 0.05  # converged once an accepted step moves no parameter more than this many steps h_j
    differences: str = "forward"  # "forward" (P evaluations per Jacobian) or "central" (2 P)

    def __post_init__(self) -> None:
        if self.iterations < 0 or self.retries < 0 or self.tolerance < 0:
            raise ValueError(f"need iterations, retries and tolerance >= 0, got {self}")
        if not (self.damping > 0 and self.damping_up > 1 and 0 < self.damping_down <= 1 and self.max_step > 0):
            raise ValueError(f"need damping > 0, damping_up > 1, 0 < damping_down <= 1, max_step > 0, got {self}")
        if self.differences not in ("forward", "central"):
            raise ValueError(f"differences must be 'forward' or 'central', got {self.differences!r}")


@dataclass(frozen=True)
class LMResult:
    """What `levenberg_marquardt` returns."""

    params: torch.Tensor  # FloatTensor (B, P): each problem's best point evaluated, the start included
    loss: torch.Tensor  # FloatTensor (B,): its squared residual
    start_loss: torch.Tensor  # FloatTensor (B,): the start's
    gain: torch.Tensor  # FloatTensor (B,): the closed-form gain at `params` (ones without `gain`)
    iterations: torch.Tensor  # LongTensor (B,): Jacobians each problem took
    evaluations: int  # black-box evaluations in all (rows of all calls)


def solve_gain(raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(M,) least-squares gain g = <f, x> / <f, f> of outputs f against targets x, both (M, D), over the entries
    where x < 1 (there a saturating clamp hides the gain)."""
    f = raw * (target < 1.0 - 1e-6)
    return (f * target).sum(1) / (f * f).sum(1).clamp(min=1e-12)


def jacobian(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    params: torch.Tensor,
    steps: torch.Tensor,
    active: torch.Tensor,
    base: torch.Tensor | None = None,
    central: bool = False,
) -> tuple[torch.Tensor, int]:
    """Finite-difference Jacobians of a batched black box, all perturbations of all problems in one call.

    Args:
        fn: black box (params (M, P), rows LongTensor (M,): the problem each row belongs to, cols LongTensor (M,):
            the entry each row perturbs) -> (M, D).
        params: FloatTensor (B, P); steps: FloatTensor (P,), h_j > 0; active: BoolTensor (B, P), the entries to
            differentiate (the others get zero rows and cost nothing).
        base: FloatTensor (B, D), fn(params) when known (forward differences need it; None: evaluated here).
        central: (f(p + h e_j) - f(p - h e_j)) / 2 h instead of (f(p + h e_j) - f(p)) / h.
    Returns:
        JT FloatTensor (B, P, D), the transposed Jacobians (JT[b, j] = d f(p_b) / d p_j), and the number of rows
        evaluated.
    """
    B, P = params.shape
    rows, cols = active.nonzero(as_tuple=True)  # (M,), (M,): one perturbation per active entry
    M = rows.shape[0]
    h = steps.to(params)[cols]  # (M,)
    shifted = params[rows].clone()
    shifted[torch.arange(M), cols] += h
    evaluations = M
    if central:
        lower = params[rows].clone()
        lower[torch.arange(M), cols] -= h
        out = fn(torch.cat([shifted, lower]), torch.cat([rows, rows]), torch.cat([cols, cols]))  # (2M, D)
        diff = (out[:M] - out[M:]) / (2 * h[:, None])
        evaluations += M
    else:
        if base is None:
            base = fn(params, torch.arange(B, device=params.device), torch.full((B,), -1, device=params.device))
            evaluations += B
        diff = (fn(shifted, rows, cols) - base[rows]) / h[:, None]  # (M, D)
    JT = params.new_zeros(B, P, diff.shape[1])
    JT[rows, cols] = diff
    return JT, evaluations


def normal_equations(JT: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """J^T J FloatTensor (B, P, P) and J^T r (B, P), in float64 (the solve compares columns of a few edge pixels
    with columns of many), from JT (B, P, D) and residuals r (B, D)."""
    return (JT @ JT.transpose(1, 2)).double(), (JT @ r[..., None]).double()[..., 0]


def damped_step(
    JtJ: torch.Tensor, Jtr: torch.Tensor, damping: torch.Tensor, active: torch.Tensor, steps: torch.Tensor,
    max_step: float = float("inf"),
) -> torch.Tensor:  # fmt: skip
    """The Levenberg-Marquardt step of each problem.

    Solves (J^T J + lambda D) delta = -J^T r with D = diag(J^T J), for the active entries whose column is not zero
    (the others are held at 0), then shrinks delta (keeping its direction) so that max_j |delta_j| / h_j <= max_step.

    Args:
        JtJ: FloatTensor (B, P, P) and Jtr (B, P), from `normal_equations`; damping: FloatTensor (B,) lambda;
        active: BoolTensor (B, P); steps: FloatTensor (P,) difference steps h_j; max_step: in units of h_j.
    Returns:
        FloatTensor (B, P) delta, in the dtype of `steps`.
    """
    diag = torch.diagonal(JtJ, dim1=1, dim2=2)  # (B, P)
    use = active & (diag > 0)
    scale = torch.where(use, diag, torch.ones_like(diag))  # Marquardt's D; 1 for the entries held
    keep = use[:, :, None] & use[:, None, :]  # only the coupling of the entries solved for
    A = torch.where(keep, JtJ, torch.zeros_like(JtJ)) + torch.diag_embed(damping[:, None].to(JtJ) * scale)
    rhs = torch.where(use, -Jtr, torch.zeros_like(Jtr))
    delta = torch.linalg.solve(A, rhs).to(steps.dtype)  # (B, P)
    ratio = (delta.abs() / steps).amax(1, keepdim=True)  # (B, 1) the largest move in steps h_j
    return delta * (max_step / ratio.clamp(min=max_step))


def levenberg_marquardt(
    fn: BlackBox,
    params: torch.Tensor,
    target: torch.Tensor,
    steps: torch.Tensor,
    active: torch.Tensor,
    settings: LMSettings | None = None,
    project: Project | None = None,
    gain: bool = False,
    smooth: Smooth | None = None,
    perturb: Perturb | None = None,
) -> LMResult:
    """Minimise || f(p; b) - x_b ||^2 for each problem b (module docstring).

    Args:
        fn: black box (params (M, P), rows LongTensor (M,)) -> FloatTensor (M, D), called without grad.
        params: FloatTensor (B, P), the start; target: FloatTensor (B, D), x.
        steps: FloatTensor (P,), the finite-difference step of each parameter (also the unit of `max_step`).
        active: BoolTensor (B, P), the free parameters (others stay as they are).
        settings: LMSettings (default LMSettings()).
        project: maps points onto the feasible set (e.g. objects back onto a table), the start and every trial;
            None: unconstrained. The start as given stays a candidate for the best point (it may be infeasible).
        gain: a free positive gain per problem, in closed form (module docstring).
        smooth: a linear map S of outputs (M, D) -> (M, D') (e.g. a blur of images) under which the steps are
            modelled and accepted, || S f(p) - S x ||^2, while the point returned is the best by the unsmoothed loss
            (module docstring); None: no smoothing.
        perturb: evaluates the Jacobian's perturbed points given the base point and its outputs (e.g. a renderer
            that redraws only the pixels one object's move can change); None: fn.
    Returns:
        LMResult.
    """
    cfg = settings or LMSettings()
    B, P = params.shape
    device = params.device
    steps = steps.to(params)
    project = project or (lambda p, rows: p)
    smoothed = smooth or (lambda y: y)
    target_s = smoothed(target)  # (B, D')

    def predict(raw: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (raw * g[:, None]).clamp(max=1.0) if gain else raw

    def evaluate(p: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """At points p (M, P) of problems rows: raw outputs (M, D), gains (M,), losses (M,), smoothed outputs
        (M, D') and their losses."""
        raw = fn(p, rows)
        g = solve_gain(raw, target[rows]) if gain else torch.ones(p.shape[0], device=device)
        out = predict(raw, g)
        loss = ((out - target[rows]) ** 2).sum(1)
        if smooth is None:
            return raw, g, loss, out, loss
        out_s = smooth(out)
        return raw, g, loss, out_s, ((out_s - target_s[rows]) ** 2).sum(1)

    with torch.no_grad():
        everyone = torch.arange(B, device=device)
        raw, g, loss, base, objective = evaluate(params, everyone)  # base: (smoothed) outputs, objective: LM's loss
        start_loss, evaluations = loss.clone(), B
        best, best_loss, best_g = params.clone(), loss.clone(), g.clone()  # the start itself is a candidate
        p = project(params.clone(), everyone)
        moved = (p != params).any(1).nonzero(as_tuple=True)[0]  # starts off the feasible set: LM starts on it
        if moved.numel() > 0:
            raw[moved], g[moved], loss[moved], base[moved], objective[moved] = evaluate(p[moved], moved)
            evaluations += moved.numel()
            lower = moved[loss[moved] < best_loss[moved]]
            best[lower], best_loss[lower], best_g[lower] = p[lower], loss[lower], g[lower]
        damping = torch.full((B,), cfg.damping, device=device)
        live = active.any(1)
        iterations = torch.zeros(B, dtype=torch.long, device=device)
        for _ in range(cfg.iterations):
            idx = live.nonzero(as_tuple=True)[0]  # (b,) the problems still moving
            if idx.numel() == 0:
                break
            iterations[idx] += 1

            def perturbed(q: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, idx=idx) -> torch.Tensor:
                problems = idx[rows]
                out = fn(q, problems) if perturb is None else perturb(q, problems, cols, p[problems], raw[problems])
                return smoothed(predict(out, g[problems]))  # at the base point's gain (module docstring)

            JT, n = jacobian(perturbed, p[idx], steps, active[idx], base[idx], cfg.differences == "central")
            evaluations += n
            JtJ, Jtr = normal_equations(JT, base[idx] - target_s[idx])  # (b, P, P), (b, P)
            del JT
            pending = torch.ones(idx.shape[0], dtype=torch.bool, device=device)  # no step accepted yet
            for _retry in range(cfg.retries + 1):
                k = pending.nonzero(as_tuple=True)[0]
                rows = idx[k]
                delta = damped_step(JtJ[k], Jtr[k], damping[rows], active[rows], steps, cfg.max_step)
                trial = project(p[rows] + delta, rows)
                t_raw, t_g, t_loss, t_base, t_objective = evaluate(trial, rows)
                evaluations += rows.shape[0]
                better = t_objective < objective[rows]
                won = rows[better]
                p[won], raw[won], g[won], base[won] = trial[better], t_raw[better], t_g[better], t_base[better]
                objective[won] = t_objective[better]
                lower = t_loss < best_loss[rows]  # the best point by the unsmoothed loss, whatever LM accepts
                kept = rows[lower]
                best[kept], best_loss[kept], best_g[kept] = trial[lower], t_loss[lower], t_g[lower]
                damping[won] *= cfg.damping_down
                damping[rows[~better]] *= cfg.damping_up
                pending[k[better]] = False
                small = (delta[better].abs() / steps).amax(1) <= cfg.tolerance  # the accepted steps that were tiny
                live[won[small]] = False
                if not pending.any():
                    break
            live[idx[pending]] = False  # no step from this Jacobian lowered the loss: converged
            live &= damping <= cfg.max_damping
    return LMResult(best, best_loss, start_loss, best_g, iterations, evaluations)
