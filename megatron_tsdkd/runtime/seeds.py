"""Every random draw derives from (seed, position): the training step, a teacher-data batch. Restoring the position
restores the random stream exactly, whatever the data-parallel layout or an interruption did."""


def derive_seed(seed: int, position: int, salt: int = 0) -> int:
    """A 31-bit seed for ``position`` (step or batch index); ``salt`` separates streams of one position."""
    return (seed * 1_000_003 + position * 7_919 + salt * 104_729) % (2**31 - 1)
