"""Datasets on many ranks: torchrun's ranks (:mod:`.ranks`), units of work handed out
through the shared store with a manifest (:mod:`.workqueue`), and the photo and video
units (:mod:`.photos`, :mod:`.videos`)."""
from .ranks import Ranks, alone, join, launched_by_torchrun, start
from .workqueue import MANIFEST_NAME, Unit, share_units

__all__ = ["Ranks", "alone", "join", "launched_by_torchrun", "start", "MANIFEST_NAME", "Unit", "share_units"]
