"""One exception type for every user-facing input problem, so the CLI can print it without a traceback."""

from __future__ import annotations


class UseripError(Exception):
    """Bad input or configuration. The message names the file/row/field and what was expected."""


class InputError(UseripError):
    """A data file does not match the expected schema."""

    def __init__(self, file: object, problem: str, *, row: int | None = None, field: str | None = None):
        where = str(file)
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}")
        self.file, self.row, self.field = file, row, field
