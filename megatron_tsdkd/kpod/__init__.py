"""KPOD (Feng et al., ICML 2024): keypoint token weighting and in-rationale progressive distillation.

Offline preparation (``tools/kpod_prepare.py`` -> ``prepare.py``) writes the artefacts; the ``kpod`` method
(methods/kpod.py) trains on the per-epoch samples ``samples.py`` materialises from them. See docs/METHOD.md, KPOD.
"""
