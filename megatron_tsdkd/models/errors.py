"""Errors a user can cause with a model folder, a checkpoint or a parallel layout.

All are ValueErrors whose message is one sentence naming the culprit, so a CLI or the trainer's preflight can
print them as they are.
"""


class ModelError(ValueError):
    """Base class: something about a model, its files or its layout that the user must fix."""


class UnsupportedModelError(ModelError):
    """The Hugging Face architecture (or one of its options) has no megatron-core mapping here."""


class ParallelLayoutError(ModelError):
    """Heads, query groups, vocabulary, FFN width or layers do not divide as the TP/PP layout needs."""


class WeightFileError(ModelError):
    """A weight file is missing, truncated or holds a tensor of the wrong shape."""


class TargetFolderError(ModelError):
    """An output folder is not empty and overwriting was not asked for."""
