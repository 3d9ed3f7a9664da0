"""Lightning callbacks: capture curvature during fine-tuning (and, in later releases, merge with it).

Importing this module imports Lightning; ``import lightning_merge`` alone does not.
"""

from lightning_merge.callbacks.capture import CurvatureCapture

__all__ = ["CurvatureCapture"]
