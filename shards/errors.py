"""The one base class of errors a user must fix (a bad setting, a bad or incomplete input).

Library code raises a subclass (``ConfigError``, ``ContractError``, ...); the ``octjepa`` dispatcher turns any of them
into one line on stderr and the subclass's ``exit_code``, for every subcommand. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class OctjepaError(Exception):
    """Something the user must fix; the message says what was expected, what was found and which input."""

    exit_code = 2
