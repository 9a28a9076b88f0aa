"""Recreate data/clip.mp4: a 3 s, 25 fps, 480 x 360 clip of data/astronaut.jpg moved like a
head in a video call (a slow turn in the image plane, a sway and a small zoom), H.264.

    python data/make_clip.py

The motion is a smooth similarity per frame (no new pixels are invented), so the face is
real and dlib finds it in every frame; it is a public-domain photo (see data/README.md).
"""
from __future__ import annotations

import os

import cv2
import imageio_ffmpeg
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = (480, 360)
FPS = 25
FRAMES = 75


def frames():
    photo = cv2.imread(os.path.join(HERE, "astronaut.jpg"))[..., ::-1]
    centre = (256.0, 200.0)  # about the middle of the face in the photo
    for k in range(FRAMES):
        t = k / FPS
        angle = 6.0 * np.sin(2 * np.pi * t / 2.4)                 # degrees, in the image plane
        scale = 1.0 + 0.06 * np.sin(2 * np.pi * t / 3.0)
        dx = 25.0 * np.sin(2 * np.pi * t / 1.9)
        dy = 10.0 * np.sin(2 * np.pi * t / 1.3 + 0.5)
        m = cv2.getRotationMatrix2D(centre, angle, scale)
        m[:, 2] += (SIZE[0] / 2 - centre[0] + dx, SIZE[1] / 2 - centre[1] + dy)
        yield cv2.warpAffine(photo, m, SIZE, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def main() -> None:
    path = os.path.join(HERE, "clip.mp4")
    gen = imageio_ffmpeg.write_frames(path, SIZE, fps=FPS, codec="libx264", quality=None, pix_fmt_out="yuv420p",
                                      macro_block_size=1, ffmpeg_log_level="error",
                                      output_params=["-crf", "26", "-preset", "slow", "-movflags", "+faststart"])
    gen.send(None)
    for f in frames():
        gen.send(np.ascontiguousarray(f))
    gen.close()
    print(f"wrote {path}: {FRAMES} frames, {os.path.getsize(path) // 1024} KB")


if __name__ == "__main__":
    main()
