"""The library's user-facing defaults, in one place: the scripts' flags read them, and the
library functions that take the same settings default to them.

Fitting weights and iteration counts are not here: they live in :mod:`core.fit.config`
(FitConfig and its presets); the video pipeline's own settings in its VideoOptions.
Paths are not here either: the library takes explicit paths; the scripts' flags decide
what a relative default such as ``fitting_cache`` means (the working directory).
"""
TAR_SIZE = 256            # side of the square crop that is fitted and rendered (SPEC §5)
PADDING_RATIO = 0.3       # the detected face box is enlarged by this ratio (SPEC §5)
FACE_INDEX = "largest"    # which face of a photo with several
PHOTO_BATCH_SIZE = 8      # photos fitted together in one batch
PRESET = "default"        # FitConfig preset (core.fit.config.PRESETS)
LM_DETECTOR = "auto"      # face-alignment's FAN when its weights are present, else dlib
DEVICE = "auto"           # cuda when available, else cpu
RENDERER = "auto"         # pytorch3d's rasterizer when it imports, else the built-in one
# The composed videos (the overlay of the fits): x264 preset and constant rate factor. On
# the 20 s 720p sample, ultrafast at 22 keeps the PSNR of veryfast at 18 (49.2 against
# 49.5 dB to the frames sent) at 2.0 instead of 4.5 CPU-seconds, for 3.4x the bytes
# (6.4 against 1.9 MB: 2.6 Mbit/s).
VIDEO_PRESET = "ultrafast"
VIDEO_CRF = 22
