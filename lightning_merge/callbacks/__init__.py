"""Lightning callbacks: capture curvature during fine-tuning and merge with it when a fit ends.

Importing this module imports Lightning; ``import lightning_merge`` alone does not.
"""

from lightning_merge.callbacks.averaging import CheckpointAveraging
from lightning_merge.callbacks.capture import CurvatureCapture
from lightning_merge.callbacks.continual import ContinualMerge
from lightning_merge.callbacks.merge_on_fit_end import MergeOnFitEnd

__all__ = ["CheckpointAveraging", "ContinualMerge", "CurvatureCapture", "MergeOnFitEnd"]
