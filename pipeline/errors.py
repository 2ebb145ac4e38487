"""The project's one exception type: its message is a sentence for the user."""


class PipelineError(Exception):
    """A failure the user can act on; the CLI prints its message without a traceback."""

    exit_code = 2  # what the command exits with after printing the sentence


class Stopped(PipelineError):
    """The user stopped the command (Ctrl-C): one sentence saying what was kept, and the shell's code 130."""

    exit_code = 130


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without its final full stop (for use inside a sentence)."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__).rstrip(".")
