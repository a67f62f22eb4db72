"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class MatvlmError(Exception):
    """Bad input or a state matvlm cannot work with; the message says what was expected."""


class NotAModelError(MatvlmError):
    """A path that is not a model directory matvlm can read."""
