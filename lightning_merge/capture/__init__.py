"""Curvature capture without Lightning: the estimators (``fisher``, ``grams``, ``second_moments``,
``fisher_accumulator``, ``post_fit``), the settings (``config``), the recorded state and what it stores
(``recorder``, ``records``), and how a module is sharded (``sharding``); the Lightning hooks are
:class:`lightning_merge.callbacks.CurvatureCapture`."""
