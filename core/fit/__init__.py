"""Fitting coefficients to landmarks and pixels (SPEC §4).

    config        FitConfig: every weight, iteration count and learning rate, and the presets
    losses        the loss terms as pure functions of tensors
    objective     Objective: the terms, their weights and the weighted total, defined once
    adam          Adam on the objective (the original's solver)
    lm            Levenberg-Marquardt on the landmark residuals (rigid stage, landmark init)
    gauss_newton  PhotometricProblem: a frame's exact loss and its Gauss-Newton model
    gn            Levenberg-Marquardt steps with that model (per frame, or shared groups)
    appearance    a closed-form start for the light and albedo
    fitter        Fitter: the stages (rigid, landmark init, photometric) and FitResult
    lanes         a batch's independent frames fitted in parts side by side on the CPU's cores
"""
