"""Levenberg-Marquardt steps with the Gauss-Newton model of the full objective (the
photometric stage of the default preset).

:class:`core.fit.gauss_newton.PhotometricProblem` gives each frame's exact loss (from the
objective) and its Gauss-Newton model; the loops here solve the damped normal equations
and keep a step only where the exact loss went down. ``gn_frames``: every group per-frame
(independent frames, one damping each). ``gn_shared``: some groups shared by the frames
(the video identity/albedo fit), one system over all frames.

A schedule is a list of (photo camera or None for the crop camera, images (B, T, T, 3),
steps) stages, coarse to fine; ``steps`` is the most a stage takes.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from core import threads
from core.models.coeffs import Coeffs
from .gauss_newton import PhotometricProblem
from .gn_state import State, cat_states, merge_states, take_state
from .lanes import cpu_lanes, frame_parts, run_lanes, take_rows
from .lm import solve_each
from .objective import Objective, PoseRef, expand

# Levenberg-Marquardt damping: start, and the factors applied after a step that lowered /
# did not lower a frame's loss.
GN_LAMBDA0, GN_LAMBDA_DOWN, GN_LAMBDA_UP = 1e-2, 0.3, 10.0
# A frame's GN stage ends early once a step gains less than GN_RTOL of its loss, or once
# its damping exceeds GN_LAMBDA_MAX (steps too short to matter). A stage that another
# follows (the coarse stage before the crop-size one) ends at GN_RTOL_COARSE: what it
# would still gain in small steps the next stage gains at its own resolution.
GN_RTOL, GN_RTOL_COARSE, GN_LAMBDA_MAX = 1e-4, 3e-3, 1e3
# ... or (per-frame fits) once GN_MAX_MISSES steps in a row did not lower its loss. Both
# measured on the 10 bench photos, 12 + 6 synthetic faces with known coefficients (Surrey,
# BFM-sized) and the sample video: about a fifth less fitting time, the same errors against
# the truth, the same NME and loss (docs/performance.md, "Where a stage stops").
GN_MAX_MISSES = 4
# The shared fit's Hessian: SHARED_HESSIAN_PIXELS covered pixels in all, spread over the frames
# (at least SHARED_MIN_PIXELS each); the gradient always uses every pixel.
SHARED_HESSIAN_PIXELS, SHARED_MIN_PIXELS = 2048, 256


def _setup(objective: Objective, coeffs: Coeffs, groups: Sequence[str], batch: int):
    """What both solvers start from: the coefficients expanded to the batch, the fixed
    groups and the model pieces they make constant, the optimised columns of id / exp /
    tex (``columns``) and of every group (``cols``), and the full group values the
    optimised columns are written into (``start``)."""
    c = expand(coeffs, batch)
    fixed = {k: v for k, v in c.as_dict().items() if k not in groups}
    cached = objective.fixed_pieces({k: getattr(coeffs, k) for k in fixed})
    columns = {g: objective.active_columns(g) for g in groups if g in ("id", "exp", "tex")}
    cols = {g: columns.get(g, torch.arange(getattr(c, g).shape[1], device=objective.device)) for g in groups}
    # Coefficients outside cols only enter their prior: its minimiser, zero.
    start = {g: torch.zeros_like(getattr(c, g)) if g in columns else getattr(c, g).detach() for g in groups}
    return c, fixed, cached, columns, cols, start


def _stages(objective: Objective, schedule, landmarks: torch.Tensor, groups: Sequence[str],
            pose_ref: Optional[PoseRef], cached, columns, hessian_pixels: Optional[int] = None):
    """(PhotometricProblem, steps) of each stage of ``schedule`` that has steps: the
    stage's camera (the crop camera when None) and images, the optimised groups in their
    order and the fixed model pieces."""
    for cam, images, steps in schedule:
        if steps > 0:
            yield PhotometricProblem(objective, landmarks, images, cam or objective.camera, groups, pose_ref,
                                     cached, columns, hessian_pixels=hessian_pixels), steps


def gn_frames(objective: Objective, coeffs: Coeffs, landmarks: torch.Tensor, schedule, groups: Tuple[str, ...],
              pose_ref: Optional[PoseRef] = None, progress: bool = False, desc: str = "non-rigid (GN)") -> Coeffs:
    """Levenberg-Marquardt on the full per-frame loss with the Gauss-Newton model of
    :mod:`core.fit.gauss_newton` (IRLS photometric term, exact landmark and prior terms).

    ``schedule``: (photo camera or None, images, steps) stages (see the module docstring);
    a step solves the damped normal equations and keeps the result for the frames
    whose exact loss went down (each frame has its own damping); ``steps`` is the most:
    a stage stops when every frame has converged (a step gaining less than GN_RTOL of its
    loss, GN_RTOL_COARSE in a stage another follows; GN_MAX_MISSES steps in a row that did
    not lower it; GN_LAMBDA_MAX). Every group must be per-frame (frames are independent
    problems)."""
    batch = landmarks.shape[0]
    c, fixed, cached, columns, cols, start = _setup(objective, coeffs, groups, batch)
    sizes = [cols[g].numel() for g in groups]
    x = torch.cat([getattr(c, g)[:, cols[g]] for g in groups], dim=1).detach()

    def unpack(v, act):
        """The coefficients of the frames ``act`` with their optimised values ``v``."""
        parts = dict(zip(groups, torch.split(v, sizes, dim=1)))
        return Coeffs(**{k: f[act] for k, f in fixed.items()},
                      **{g: start[g][act].index_copy(1, cols[g], parts[g]) for g in groups})

    bar = tqdm(total=sum(n for _, _, n in schedule), desc=desc, disable=not progress, leave=False)
    stages = list(_stages(objective, schedule, landmarks, groups, pose_ref, cached, columns))
    for k, (prob, steps) in enumerate(stages):
        rtol = GN_RTOL if k == len(stages) - 1 else GN_RTOL_COARSE
        # The frames still moving (``act``, source ids) and their problem: a frame that has
        # converged leaves the batch, so later steps render and solve only the others.
        act = torch.arange(batch, device=x.device)
        sub = prob
        kp = sub.objective.keypoints(unpack(x, act), landmarks)
        st = sub.evaluate(unpack(x, act), kp)
        hess, grad = sub.linearize(st)
        lam = torch.full((batch,), GN_LAMBDA0, dtype=torch.float64, device=objective.device)
        misses = torch.zeros(batch, dtype=torch.long, device=objective.device)
        for step in range(steps):
            threads.tick()
            h = hess.double()
            damp = lam[:, None] * torch.diagonal(h, dim1=1, dim2=2) + 1e-12
            delta = solve_each(h + torch.diag_embed(damp), -grad.double()).to(x.dtype)
            xa = x[act]
            trial = sub.evaluate(unpack(xa + delta, act), kp)
            better = trial.cost < st.cost
            # A frame is done when a step gains less than ``rtol`` of its loss, when
            # GN_MAX_MISSES steps in a row did not lower it (after a run of small accepted
            # steps the damping is so low that the first tries are nearly the same step),
            # or when the damping has grown so large that steps no longer move it.
            small = better & (st.cost - trial.cost < rtol * st.cost)
            lam = torch.where(better, lam * GN_LAMBDA_DOWN, lam * GN_LAMBDA_UP).clamp(1e-8, 1e8)
            misses = torch.where(better, 0, misses + 1)
            done = small | (lam > GN_LAMBDA_MAX) | (misses >= GN_MAX_MISSES)
            bar.update(1)
            if bool(better.any()):
                x = x.index_copy(0, act, torch.where(better[:, None], xa + delta, xa))
            if bool(done.all()) or step == steps - 1:
                break
            if bool(done.any()):  # converged frames leave the batch
                keep = ~done
                act, lam, hess, grad, better = act[keep], lam[keep], hess[keep], grad[keep], better[keep]
                misses = misses[keep]
                st, trial = take_state(st, keep), take_state(trial, keep)
                kp = None if kp is None else kp[keep]
                sub = prob.subset(act)
            if not bool(better.any()):
                continue
            # The landmark vertex ids at the new points (None: fixed keypoints; a contour
            # model's jaw vertices move with the pose).
            kp = sub.objective.keypoints(unpack(x[act], act), landmarks[act])
            # Each frame's render at its point: the trial's where it moved, the old one where
            # not; then only the landmark term with the new vertex ids.
            st = trial if bool(better.all()) else merge_states(better, trial, st)
            if kp is not None:
                st = sub.rekey(st, kp)
            # Frames that did not move keep their Gauss-Newton model.
            h_new, g_new = sub.linearize(st, frames=better)
            hess = torch.where(better[:, None, None], h_new, hess)
            grad = torch.where(better[:, None], g_new, grad)
    bar.close()
    every = torch.arange(batch, device=x.device)
    return Coeffs(**{k: v.detach() for k, v in unpack(x, every).as_dict().items()})

def gn_shared(objective: Objective, coeffs: Coeffs, landmarks: torch.Tensor, schedule, groups: Tuple[str, ...],
              pose_ref: Optional[PoseRef] = None, progress: bool = False,
              desc: str = "non-rigid, shared groups (GN)") -> Coeffs:
    """Levenberg-Marquardt with the Gauss-Newton model when some groups are shared by
    the B frames (batch 1 in ``coeffs``; the video identity/albedo fit).

    The loss is Objective.total's for shared groups: the mean over the frames of the
    data terms plus every prior once (a shared group's once, a per-frame group's for
    every frame). One system over [shared | frame 1 | ... | frame B] parameters: the
    frames' Gauss-Newton models (data terms) averaged into the shared block and its
    couplings, the priors added on the diagonal; one damping for the whole fit. Each
    frame's photometric Hessian is sampled at SHARED_HESSIAN_PIXELS / B covered pixels (at least
    SHARED_MIN_PIXELS); the gradient uses them all."""
    batch = landmarks.shape[0]
    shared = [g for g in groups if getattr(coeffs, g).shape[0] == 1]
    order = tuple(shared + [g for g in groups if g not in shared])
    c, fixed, cached, columns, cols, start = _setup(objective, coeffs, order, batch)
    ks = sum(cols[g].numel() for g in shared)
    kf = sum(cols[g].numel() for g in order if g not in shared)
    xs = torch.cat([getattr(c, g)[:1, cols[g]] for g in shared], dim=1).detach()          # (1, ks)
    xf = torch.cat([getattr(c, g)[:, cols[g]] for g in order if g not in shared], dim=1).detach()  # (B, kf)

    def unpack(vs, vf):
        full = torch.cat([vs.expand(batch, -1), vf], dim=1)
        parts = dict(zip(order, torch.split(full, [cols[g].numel() for g in order], dim=1)))
        return Coeffs(**fixed, **{g: start[g].index_copy(1, cols[g], parts[g]) for g in order})

    def total(st):  # the shared-mode loss (see the docstring)
        return objective.total(st.terms, shared)

    def system(st, prob):
        hb, gb = prob.linearize(st, with_priors=False)  # (B, P, P), (B, P), data terms of each frame
        n = ks + batch * kf
        h = torch.zeros(n, n, dtype=torch.float64, device=objective.device)
        g = torch.zeros(n, dtype=torch.float64, device=objective.device)
        hb, gb = hb.double() / batch, gb.double() / batch
        h[:ks, :ks] = hb[:, :ks, :ks].sum(0)
        g[:ks] = gb[:, :ks].sum(0)
        for b in range(batch):
            blk = slice(ks + b * kf, ks + (b + 1) * kf)
            h[:ks, blk] = hb[b, :ks, ks:]
            h[blk, :ks] = hb[b, ks:, :ks]
            h[blk, blk] = hb[b, ks:, ks:]
            g[blk] = gb[b, ks:]
        # The priors, each once per coefficient of the system.
        x = torch.cat([xs[0], xf.reshape(-1)]).double()
        diag, ref = torch.zeros(n, dtype=torch.float64, device=objective.device), torch.zeros_like(x)
        weights = prob.priors()
        pos = 0
        for grp in shared:
            k = cols[grp].numel()
            diag[pos:pos + k] = weights.get(grp, (0.0, None))[0]
            pos += k
        off = 0
        for grp in (g2 for g2 in order if g2 not in shared):
            k = cols[grp].numel()
            w, r = weights.get(grp, (0.0, None))
            for b in range(batch):
                i = ks + b * kf + off
                diag[i:i + k] = w
                if r is not None:
                    ref[i:i + k] = r[b, cols[grp]].double()
            off += k
        idx = torch.arange(n, device=objective.device)
        h[idx, idx] += 2 * diag
        g += 2 * diag * (x - ref)
        return h, g

    bar = tqdm(total=sum(n for _, _, n in schedule), desc=desc, disable=not progress, leave=False)
    per_frame = max(SHARED_MIN_PIXELS, SHARED_HESSIAN_PIXELS // batch)
    for prob, steps in _stages(objective, schedule, landmarks, order, pose_ref, cached, columns, per_frame):
        prob = _FramesInLanes(prob, shared_lanes(objective.device, batch))
        kp = objective.keypoints(unpack(xs, xf), landmarks)
        st = prob.evaluate(unpack(xs, xf), kp)
        cost = total(st)
        h, g = system(st, prob)
        lam = GN_LAMBDA0
        for step in range(steps):
            threads.tick()
            delta = torch.linalg.solve(h + torch.diag(lam * torch.diagonal(h) + 1e-12), -g).to(xs.dtype)
            ts, tf = xs + delta[:ks][None], xf + delta[ks:].view(batch, kf)
            trial = prob.evaluate(unpack(ts, tf), kp)
            new = total(trial)
            bar.update(1)
            if not bool(new < cost):
                # No GN_MAX_MISSES here: the identity is every frame's, and stopping it
                # there moved the rendered test video's head rotation error (frame camera)
                # from 3.34 to 3.72 degrees (docs/performance.md, "Where a stage stops").
                lam *= GN_LAMBDA_UP
                if lam > GN_LAMBDA_MAX:
                    break
                continue
            gain = float(cost - new)
            xs, xf, cost, st = ts, tf, new, trial
            lam *= GN_LAMBDA_DOWN
            if gain < GN_RTOL * float(cost) or step == steps - 1:
                break
            if objective.model.has_contour:  # new landmark vertices, same render
                kp = objective.keypoints(unpack(xs, xf), landmarks)
                st = prob.rekey(st, kp)
                cost = total(st)
            h, g = system(st, prob)
    bar.close()
    out = unpack(xs, xf).as_dict()
    return Coeffs(**{k: (v[:1] if k in shared else v).detach() for k, v in out.items()})


def shared_lanes(device, batch: int) -> int:
    """Lanes for the frames of :func:`gn_shared` (:func:`core.fit.lanes.cpu_lanes`), each
    of at least 2 frames (:func:`core.fit.gn_state.cat_states`)."""
    return max(1, min(cpu_lanes(device, batch), batch // 2))


class _FramesInLanes:
    """A :class:`~core.fit.gauss_newton.PhotometricProblem` whose per-frame work (evaluate,
    linearize) runs in ``lanes`` contiguous parts of the frames side by side
    (:func:`core.fit.lanes.run_lanes`): a frame's loss and Gauss-Newton model are its
    own, so the parts' results put together are the batch's (up to rounding). On 2 cores
    the video identity fit's 8 frames otherwise kept one core busy. The rest is the
    problem's own."""

    def __init__(self, prob, lanes: int):
        self.prob = prob
        batch = prob.landmarks.shape[0]
        self.parts = frame_parts(batch, lanes, prob.landmarks.device) if lanes > 1 else []
        self.subs = [prob.subset(idx) for idx in self.parts]

    def __getattr__(self, name):
        return getattr(self.prob, name)

    def evaluate(self, c: Coeffs, keypoints) -> State:
        if not self.parts:
            return self.prob.evaluate(c, keypoints)
        return cat_states(run_lanes([
            (lambda sub=sub, idx=idx: sub.evaluate(take_rows(c, idx), None if keypoints is None else keypoints[idx]))
            for sub, idx in zip(self.subs, self.parts)], name="gn-lane"))

    def linearize(self, st: State, frames=None, with_priors: bool = True):
        if not self.parts or frames is not None:
            return self.prob.linearize(st, frames=frames, with_priors=with_priors)
        parts = run_lanes([(lambda sub=sub, idx=idx: sub.linearize(take_state(st, idx), with_priors=with_priors))
                           for sub, idx in zip(self.subs, self.parts)], name="gn-lane")
        return torch.cat([h for h, _ in parts]), torch.cat([g for _, g in parts])
