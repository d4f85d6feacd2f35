"""The one error type for bad input.

Raised for anything the user can fix (a wrong path, flag, file, label, variable), with one
sentence that says what is wrong and how to fix it. The command line catches only this type:
any other exception (a CUDA out-of-memory, a bug of ours) keeps its traceback.
It is a ValueError, so Python callers that catch ValueError keep working.
"""


class InputError(ValueError):
    pass
