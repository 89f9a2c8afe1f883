"""One exception type for every user-facing failure.

The command line prints its message as a single line and exits non-zero; the Slicer
Logic shows it in a dialog. Messages name the file or parameter that is wrong.
"""


class FewShotSegError(Exception):
    """A problem with the user's input (file, mask, checkpoint, option), not a bug."""

    def __str__(self) -> str:  # keep it on one line whatever the caller passed
        return " ".join(super().__str__().split())
