"""What the scripts run, built from the other wings.

    cli       the scripts' shared flags, logging streams, exit codes and one-line errors
    session   Session: the model, camera, renderer and fitter chosen by the flags
    photo     the single-photo pipeline (SPEC §5): read, detect, crop, fit, write
    video     the video pipeline: landmark pass, shared identity/albedo fit, clip workers on
              torch.multiprocessing, cache, compose and encode
"""
