"""The exception types the CLI turns into a one-line error and an exit code."""

from __future__ import annotations

from typing import Any


class VLMError(Exception):
    """A problem with the user's input or setup, reported as one line, never a traceback.

    `exit_code` 2 means bad input (a file, an argument, a config value); 1 means the setup is missing
    something (e.g. no checkpoint).
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class OptionError(VLMError):
    """A value an option does not accept: "NAME must be ACCEPTED, got VALUE". The CLI prints NAME as `--NAME`."""

    def __init__(self, option: str, accepted: str, value: Any):
        super().__init__(f"{option} must be {accepted}, got {value!r}")
        self.option = option
