"""Fitting coefficients to landmarks and pixels (SPEC §4).

    config        FitConfig: every weight, iteration count and learning rate, and the presets
    losses        the loss terms as pure functions
    gauss_newton  the Gauss-Newton model of the photometric loss (gradient, IRLS Hessian)
    fitter        Fitter: the rigid and non-rigid stages of a photo or a video frame
"""
