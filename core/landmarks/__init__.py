"""Where the face is, in photo pixels (x = column, y = row, integer = pixel centre).

    detect     face boxes and 68 iBUG landmarks: face-alignment's FAN, dlib as the offline
               fallback
    tracking   FaceTracker: one face followed through a video (detect once, then track)
    crop       the square face box, crop and resize, point mapping, paste back
    metrics    landmark error (NME over the inner points, inter-ocular distance)
    smoothing  a track's points smoothed over time (Savitzky-Golay, no lag) before fitting
"""
