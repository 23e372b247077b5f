"""The error raised for every problem found while reading a select statement."""

from __future__ import annotations

__all__ = ["RuleSyntaxError"]


class RuleSyntaxError(Exception):
    """A select statement could not be read.

    Every problem the lexer or the parser finds (an unknown keyword or field, an
    unterminated string, a duplicate series name, an invalid regular expression, a
    ``CHECK`` that names an unknown series, ...) is reported with this exception,
    positioned at the offending token.

    Attributes:
        source: Where the statement came from (a file name, or ``"<string>"``).
        line: 1-based line of the offending token.
        column: 1-based column of the offending token (in characters).
        token: The offending token as written (``"<end of input>"`` at the end).
        message: What is wrong, without the position.
        source_line: The full text of line ``line`` (without its newline).
        length: How many characters of ``source_line`` the token spans (at least 1).

    ``str(error)`` renders ``FILE:LINE:COL: message``, then the source line and a
    caret ``^`` (followed by ``~`` for the rest of the token) under the token.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str,
        line: int,
        column: int,
        token: str,
        source_line: str = "",
        length: int = 1,
    ) -> None:
        if line < 1 or column < 1:
            raise ValueError(f"line and column are 1-based, got {line}:{column}")
        super().__init__(message)
        self.message = message
        self.source = source
        self.line = line
        self.column = column
        self.token = token
        self.source_line = source_line
        self.length = max(1, length)

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only constructor arguments: pickle needs to be told how to rebuild.
        return (
            _rebuild,
            (
                self.message,
                self.source,
                self.line,
                self.column,
                self.token,
                self.source_line,
                self.length,
            ),
        )

    def caret_line(self) -> str:
        """The line that marks the token: spaces (tabs kept) then ``^~~``."""
        prefix = "".join("\t" if ch == "\t" else " " for ch in self.source_line[: self.column - 1])
        available = max(1, len(self.source_line) - (self.column - 1))
        return prefix + "^" + "~" * (min(self.length, available) - 1)

    def __str__(self) -> str:
        header = f"{self.source}:{self.line}:{self.column}: {self.message}"
        return f"{header}\n{self.source_line}\n{self.caret_line()}"


def _rebuild(
    message: str,
    source: str,
    line: int,
    column: int,
    token: str,
    source_line: str,
    length: int,
) -> RuleSyntaxError:
    return RuleSyntaxError(
        message,
        source=source,
        line=line,
        column=column,
        token=token,
        source_line=source_line,
        length=length,
    )
