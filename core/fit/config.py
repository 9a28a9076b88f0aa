"""Fitting configuration: every default of SPEC §4 in one place, and named presets.

``original`` is exactly the original scripts' schedule (Adam everywhere, 1000 rigid and
500 non-rigid iterations for a photo or a clip's first frame, 50 / 30 for the following
video frames). ``default`` reaches the same loss far sooner (bench/): the rigid stage and
a landmark-driven initialisation of identity and expression are solved by
Levenberg-Marquardt on the 68 landmark vertices, and the photometric stage by
Gauss-Newton / Levenberg-Marquardt steps on the full loss (core.fit.gauss_newton), most of
them at 128 px; a following video frame, warm-started from the previous one, takes two
landmark LM iterations and one photometric step at 128 px.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Dict, Optional


@dataclass(frozen=True)
class FitConfig:
    """Weights, learning rates and iteration counts of the fitting stages."""

    # Iterations: photo / first video frame, then each following video frame.
    first_rf_iters: int = 1000
    first_nrf_iters: int = 500
    rest_rf_iters: int = 50
    rest_nrf_iters: int = 30
    rf_lr: float = 1e-2
    nrf_lr: float = 1e-2
    # Non-rigid learning rate of video frames warm-started from the previous frame
    # (None: nrf_lr, as in the original).
    rest_nrf_lr: Optional[float] = None
    # Loss weights (SPEC §4).
    lm_loss_w: float = 100.0
    # Relative weights of the 68 landmarks' groups (core.fit.losses.landmark_weights):
    # the jaw contour, the nose bridge and mouth, the other inner points (SPEC: 1, 10, 1).
    lm_jaw_w: float = 1.0
    lm_heavy_w: float = 10.0
    lm_inner_w: float = 1.0
    # Robust landmark loss: Charbonnier's ρ with this scale in crop pixels, which counts a
    # point's distance rather than its square beyond it (0: SPEC's squared distance).
    lm_robust_px: float = 0.0
    rgb_loss_w: float = 1.6
    id_reg_w: float = 1e-3
    exp_reg_w: float = 0.8e-3
    tex_reg_w: float = 1.7e-6
    tex_w: float = 1.0
    rot_reg_w: float = 1.0
    trans_reg_w: float = 1.0
    # Solvers. "adam": the original; "lm": Levenberg-Marquardt on the landmark residuals.
    rigid_solver: str = "adam"
    # Photometric stage: "adam" (the original) or "gn": Levenberg-Marquardt steps with a
    # Gauss-Newton model of the full loss (core.fit.gauss_newton); the photometric iteration
    # counts are then the most steps (a stage stops once the loss no longer moves).
    nonrigid_solver: str = "adam"
    # Landmark-only LM on pose + id + exp before the photometric stage (0 = off).
    lm_init_iters: int = 0
    # Photometric stage: learning rate of the light (SH) coefficients, as a multiple of
    # nrf_lr (1 = the original: one learning rate for all groups).
    gamma_lr_scale: float = 1.0
    # Closed-form initial light and albedo (least squares on the visible vertices) before
    # the photometric stage (off in the original, which starts them at zero).
    init_light: bool = False
    init_albedo: bool = False  # with init_light: also the albedo coefficients
    # Coarse-to-fine photometric stage: all but the last ``fine_iters`` iterations compare
    # render and crop at ``coarse_size`` pixels (0 = always at the crop size).
    coarse_size: int = 0
    fine_iters: int = 0
    # Gradient of the shading through the vertex normals (the original: yes).
    normals_grad: bool = True
    # Following video frames (warm-started from the previous frame): landmark init
    # iterations, full-resolution photometric iterations (None: fine_iters) and normals
    # gradient (None: normals_grad). See following_frames().
    rest_lm_init_iters: int = 0
    rest_fine_iters: Optional[int] = None
    rest_normals_grad: Optional[bool] = None
    # The video identity/albedo fit (id and tex shared by nframes_shape frames): its
    # coarse size and full-resolution iterations (None: coarse_size / fine_iters). See
    # shape_stage().
    shape_coarse_size: Optional[int] = None
    shape_fine_iters: Optional[int] = None
    # Frames of that fit, spread over the video (fit_video.py --nframes_shape; SPEC: 16).
    shape_frames: int = 16
    # A video's landmark track smoothed over this many frames before it is fitted
    # (core.landmarks.smoothing, fit_video.py --lm_smooth; 0: as detected, the original).
    lm_smooth: int = 0
    # A video's per-frame fits also start a chain at each identity frame, from its
    # identity-fit coefficients, and a worker fits its clip's chains in lockstep batches
    # (core.pipelines.video.clips; fit_video.py --shape_seeds). Off: every clip is one
    # chain, each frame warm-started from the one before (SPEC §5).
    shape_seeds: bool = False

    def with_overrides(self, **kw) -> "FitConfig":
        """A copy with the given fields replaced; ``None`` values are ignored."""
        names = {f.name for f in fields(self)}
        unknown = set(kw) - names
        if unknown:
            raise ValueError(f"Unknown fit settings: {sorted(unknown)}")
        return replace(self, **{k: v for k, v in kw.items() if v is not None})

    def following_frames(self) -> "FitConfig":
        """The settings a following video frame is fitted with (its rigid and non-rigid
        iteration counts are rest_rf_iters / rest_nrf_iters, passed to Fitter.fit)."""
        return self.with_overrides(nrf_lr=self.rest_nrf_lr, lm_init_iters=self.rest_lm_init_iters,
                                   fine_iters=self.rest_fine_iters, normals_grad=self.rest_normals_grad)

    def shape_stage(self) -> "FitConfig":
        """The settings of the video identity/albedo fit (iterations: first_*)."""
        return self.with_overrides(coarse_size=self.shape_coarse_size, fine_iters=self.shape_fine_iters)

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


PRESETS: Dict[str, FitConfig] = {
    "original": FitConfig(),
    # LM rigid + landmark init, then at most 20 Gauss-Newton steps at 128 px and 10 at the
    # crop size (each stage stops when the loss no longer moves), for a photo, a clip's
    # first frame and the video identity/albedo fit alike. See docs/performance.md for
    # what the bench measured. A least-squares light/albedo start (init_light) made fits worse in
    # development.
    # The landmark term (issue 17, docs/performance.md "Against eos"): every inner point
    # weighs the same, 2x a jaw-contour point (SPEC: the mouth and nose bridge 10x the
    # rest, so the fit traded the eyes and brows for the mouth; a lighter jaw costs head
    # rotation accuracy), a robust loss beyond 2 px
    # (one badly detected point no longer bends the face), and the landmark weight and the
    # identity prior set so that the landmarks outweigh the priors a little more (both:
    # the fitted landmarks nearer the detector's and the model's nearer the true ones on
    # rendered faces, lower photometric loss, less jitter).
    "default": FitConfig(
        first_rf_iters=12, first_nrf_iters=30, rest_rf_iters=0, rest_nrf_iters=1,
        rigid_solver="lm", lm_init_iters=10, nonrigid_solver="gn",
        nrf_lr=3e-2, rest_nrf_lr=5e-3, coarse_size=128, fine_iters=10,
        rest_lm_init_iters=2, rest_fine_iters=0, rest_normals_grad=False,
        lm_jaw_w=1.0, lm_heavy_w=2.0, lm_inner_w=2.0, lm_robust_px=2.0, lm_loss_w=250.0, id_reg_w=3e-4,
        # The pose prior of following frames (towards the previous frame's pose): SPEC's 1
        # with the robust landmark term, which pulls only linearly beyond 2 px, makes the
        # head lag behind fast turns (2-4° on the rendered videos). 0.3: rotation and
        # landmark error against the truth lower on 3 rendered videos with either camera,
        # the same jitter (docs/performance.md, "The pose prior").
        rot_reg_w=0.3, trans_reg_w=0.3,
        # The video identity/albedo fit (issue 14): 8 frames at 64 px, no full-size steps:
        # 2.8 s instead of 10 s on the 20 s sample, the same per-frame NME and, on the
        # rendered video with known poses, the same rotation, landmark error and jitter.
        shape_frames=8, shape_coarse_size=64, shape_fine_iters=0,
        # The inner landmarks' tracks smoothed over 5 frames (no lag): on 3 rendered videos
        # the jitter against the truth about a quarter lower, head rotation no worse; on the
        # real sample video the fitted landmarks' acceleration 40 % lower (docs/performance.md).
        lm_smooth=5,
        # Chains from the identity frames, fitted in lockstep (issue 14): one worker's
        # per-frame stage about a fifth faster on the 20 s sample (2 CPU cores), the same
        # NME; jitter and head rotation on rendered videos unchanged (docs/performance.md,
        # "Chains from the identity frames"). Batches are what a GPU needs.
        shape_seeds=True,
    ),
}


def get_preset(name: str) -> FitConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"Unknown preset '{name}'; choose from {sorted(PRESETS)}") from None
