"""The one exception type the CLI turns into a one-line error and an exit code."""


class VLMError(Exception):
    """A problem with the user's input or setup, reported as one line, never a traceback.

    `exit_code` 2 means bad input (a file, an argument, a config value); 1 means the setup is missing
    something (e.g. no checkpoint).
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
