"""core: a differentiable 3D Morphable Face Model fitting library in PyTorch.

Wings (sub-packages, each with one kind of job; docs/architecture.md has the map):
    models      the face model (nn.Module with buffers), its coefficient layout and geometry,
                the loaders and their registry (BFM09, Surrey, BFM 2017, synthetic), landmark
                maps, and the one-off BFM09 conversion
    render      the camera of SPEC §3 and the differentiable rasterizer (pure PyTorch, or
                pytorch3d where it imports)
    fit         the objective of SPEC §4 (loss terms and their weighted total, defined once),
                the solvers (Adam, Levenberg-Marquardt, Gauss-Newton) and the Fitter
    landmarks   where the face is: 68-point detectors, tracking through a video, the square
                face crop, landmark error measures
    io          images, videos, result files, atomic writes
    pipelines   what the scripts run: the shared flags and exit codes (cli), the session
                (model + camera + renderer + fitter from flags), the photo pipeline and the
                video pipeline

Ground floor (flat, imports no wing): errors (UserError), resources (the shipped files),
defaults (the defaults the flags show), device, threads (the adaptive CPU thread count).
"""
