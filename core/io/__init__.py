"""Files in and out; every output is written under a temporary name, checked, then renamed.

    atomic    atomic_path / write_text_atomic: temp name -> check -> rename
    image     reading photos (size limits, EXIF orientation) and writing images
    video     VideoReader, probing videos (re-exports video_out)
    video_out VideoWriter over an ffmpeg pipe, VideoConcat (parts joined), checking videos
    outputs   a photo's result files (coefficients, mesh, composed image, info) as one group
"""
