"""The base class of the errors that mean the input is wrong, not the code.

A config that does not fit its dataclass, a record or a medium that will not load, a malformed message, a name
no registry knows: each raises a subclass of `InputError` whose message names the offending thing. The `mllm`
command prints that message on one line and exits with status 2; every other exception is a bug and keeps its
traceback (so does an `InputError` when `MLLM_TRACEBACK=1`).
"""


class InputError(Exception):
    """Wrong input, named in the message."""
