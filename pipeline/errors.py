"""The project's one exception type: its message is a sentence for the user."""


class PipelineError(Exception):
    """A failure the user can act on; the CLI prints its message without a traceback."""
