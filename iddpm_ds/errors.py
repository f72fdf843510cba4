"""The errors meant for the user as they are: an entry point prints one as a single
`NAME: error: ...` line (flags.run_cli), never a traceback."""


class ConfigError(ValueError):
    """A flag, flag combination or DeepSpeed JSON the run cannot start with."""


class DataError(ValueError):
    """A dataset that cannot be used (missing, empty, unlabelled where labels are needed, changed)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, saved or used with these flags."""


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite losses."""


def agreed(error: Exception) -> Exception:
    """Mark an error that every rank raises alike, after agreeing on it (a failed save, a diverged run, a
    locked run directory): rank 0 alone prints it."""
    error.every_rank = True
    return error


def first_line(e: BaseException) -> str:
    """An exception's message cut to its first line (its type's name if it has none), for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
