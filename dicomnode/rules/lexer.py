"""Tokenizer for the select language.

The lexer turns a statement into a list of :class:`Token` ending with an ``EOF``
token. It knows the lexical rules only:

* keywords (``SELECT``, ``WHERE``, ``and``, ``Containing``, ...) are case-insensitive
  and come back as ``KEYWORD`` tokens whose ``value`` is upper case;
* other words (``[A-Za-z_][A-Za-z0-9_]*``) are ``IDENT`` tokens (field names, bare
  values such as ``MR`` or ``true``, series names);
* strings are quoted with ``"`` or ``'``; inside, ``\\\\``, ``\\"``, ``\\'``, ``\\n``,
  ``\\r`` and ``\\t`` are escapes and any other backslash is kept as written, so that
  regular expressions such as ``'\\d+'`` read naturally; a string ends on its line;
* numbers are ``[+-]digits[.digits][e[+-]digits]``; a number glued to letters
  (``3D``) is an error: quote such values;
* tags are ``(gggg,eeee)`` (also ``("0xgggg","0xeeee")`` as the ``ror`` tool
  writes them) and come back as ``TAG`` tokens valued ``"(GGGG,EEEE)"``;
* ``#`` and ``--`` start a comment that runs to the end of the line.
"""

from __future__ import annotations

import bisect
import enum
import re
from dataclasses import dataclass

from .errors import RuleSyntaxError

__all__ = ["KEYWORDS", "SourceText", "Token", "TokenKind", "lex", "tokenize"]

KEYWORDS = frozenset(
    {
        "SELECT",
        "FROM",
        "WHERE",
        "SERIES",
        "NAMED",
        "HAS",
        "ALSO",
        "CHECK",
        "AND",
        "OR",
        "NOT",
        "CONTAINING",
        "REGEXP",
        "APPROX",
        "PATIENT",
        "STUDY",
    }
)
"""Reserved words of the language (matched case-insensitively)."""

END_OF_INPUT = "<end of input>"


class TokenKind(enum.Enum):
    """What a token is."""

    KEYWORD = "keyword"
    IDENT = "identifier"
    STRING = "string"
    NUMBER = "number"
    TAG = "tag"
    OP = "operator"
    LPAREN = "'('"
    RPAREN = "')'"
    AT = "'@'"
    EOF = "end of input"


@dataclass(frozen=True)
class Token:
    """One token.

    Attributes:
        kind: The token's kind.
        text: The token exactly as written in the source.
        value: The token's meaning: upper-case keyword, unescaped string, canonical
            ``(GGGG,EEEE)`` tag, or the text for other kinds.
        line: 1-based line.
        column: 1-based column.
        offset: 0-based character offset in the statement.
    """

    kind: TokenKind
    text: str
    value: str
    line: int
    column: int
    offset: int

    def describe(self) -> str:
        """A short human description, used in error messages."""
        if self.kind is TokenKind.EOF:
            return END_OF_INPUT
        return repr(self.text)


class SourceText:
    """A statement's text with line bookkeeping, for positions and error rendering."""

    def __init__(self, text: str, source: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"a select statement must be str, got {type(text).__name__}")
        self.text = text
        self.source = source
        self._line_starts = [0] + [m.end() for m in re.finditer(r"\r\n|\n|\r", text)]

    def position(self, offset: int) -> tuple[int, int]:
        """1-based ``(line, column)`` of a character offset."""
        index = bisect.bisect_right(self._line_starts, offset) - 1
        return index + 1, offset - self._line_starts[index] + 1

    def line_text(self, line: int) -> str:
        """The text of a 1-based line, without its line break."""
        if line < 1 or line > len(self._line_starts):
            return ""
        start = self._line_starts[line - 1]
        end = self._line_starts[line] if line < len(self._line_starts) else len(self.text)
        return self.text[start:end].rstrip("\r\n")

    def error(
        self, message: str, *, line: int, column: int, token: str, length: int | None = None
    ) -> RuleSyntaxError:
        """Build a :class:`RuleSyntaxError` positioned at ``line:column``."""
        return RuleSyntaxError(
            message,
            source=self.source,
            line=line,
            column=column,
            token=token,
            source_line=self.line_text(line),
            length=len(token) if length is None else length,
        )

    def error_at_token(self, message: str, token: Token) -> RuleSyntaxError:
        """Build a :class:`RuleSyntaxError` positioned at ``token``."""
        return self.error(
            message,
            line=token.line,
            column=token.column,
            token=token.describe() if token.kind is TokenKind.EOF else token.text,
            length=1 if token.kind is TokenKind.EOF else len(token.text),
        )


_WS = re.compile(r"[ \t\r\n\f\v]+")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_WORDISH = re.compile(r"[A-Za-z0-9_.+-]*")
_TAG = re.compile(
    r"""\([ \t]*(["']?)(?:0[xX])?([0-9A-Fa-f]{4})\1[ \t]*,"""
    r"""[ \t]*(["']?)(?:0[xX])?([0-9A-Fa-f]{4})\3[ \t]*\)"""
)
_TAG_LIKE = re.compile(r"""\([ \t]*["']?(?:0[xX])?[0-9A-Fa-f]+["']?[ \t]*,[^)\n]*\)?""")
_OPERATORS = ("==", "<=", ">=", "=", "<", ">")
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "r": "\r", "t": "\t"}


def tokenize(text: str, *, source: str = "<string>") -> list[Token]:
    """Split ``text`` into tokens, ending with an ``EOF`` token.

    Raises:
        RuleSyntaxError: On an unexpected character, an unterminated string, a
            malformed number or a malformed tag.
    """
    return lex(SourceText(text, source))


def lex(src: SourceText) -> list[Token]:
    """Like :func:`tokenize`, for a :class:`SourceText` the caller keeps."""
    return _Lexer(src).run()


class _Lexer:
    def __init__(self, src: SourceText) -> None:
        self.src = src
        self.text = src.text
        self.pos = 0
        self.tokens: list[Token] = []

    def run(self) -> list[Token]:
        text = self.text
        while True:
            self._skip_blanks()
            if self.pos >= len(text):
                break
            ch = text[self.pos]
            if ch in "\"'":
                self._string()
            elif ch == "(":
                self._paren_or_tag()
            elif ch == ")":
                self._emit(TokenKind.RPAREN, self.pos + 1)
            elif ch == "@":
                self._emit(TokenKind.AT, self.pos + 1)
            elif ch.isascii() and (ch.isalpha() or ch == "_"):
                self._word()
            elif ch in "0123456789+-." and _NUMBER.match(text, self.pos):
                self._number()
            elif any(text.startswith(op, self.pos) for op in _OPERATORS):
                op = next(op for op in _OPERATORS if text.startswith(op, self.pos))
                self._emit(TokenKind.OP, self.pos + len(op), value="=" if op == "==" else op)
            else:
                line, column = self.src.position(self.pos)
                hint = " (did you mean '=' or '=='?)" if ch == "!" else ""
                raise self.src.error(
                    f"unexpected character {ch!r}{hint}", line=line, column=column, token=ch
                )
        self._emit_eof()
        return self.tokens

    # -- helpers ---------------------------------------------------------------------

    def _emit(self, kind: TokenKind, end: int, value: str | None = None) -> None:
        raw = self.text[self.pos : end]
        line, column = self.src.position(self.pos)
        self.tokens.append(
            Token(kind, raw, raw if value is None else value, line, column, self.pos)
        )
        self.pos = end

    def _emit_eof(self) -> None:
        if self.tokens:
            last = self.tokens[-1]
            line, column = last.line, last.column + len(last.text)
            offset = last.offset + len(last.text)
        else:
            line, column, offset = 1, 1, 0
        self.tokens.append(Token(TokenKind.EOF, "", "", line, column, offset))

    def _skip_blanks(self) -> None:
        text = self.text
        while self.pos < len(text):
            ws = _WS.match(text, self.pos)
            if ws:
                self.pos = ws.end()
                continue
            if text[self.pos] == "#" or text.startswith("--", self.pos):
                newline = text.find("\n", self.pos)
                self.pos = len(text) if newline < 0 else newline
                continue
            break

    def _word(self) -> None:
        match = _IDENT.match(self.text, self.pos)
        assert match is not None  # the caller checked the first character
        word = match.group()
        if word.upper() in KEYWORDS:
            self._emit(TokenKind.KEYWORD, match.end(), value=word.upper())
        else:
            self._emit(TokenKind.IDENT, match.end())

    def _number(self) -> None:
        match = _NUMBER.match(self.text, self.pos)
        assert match is not None  # the caller checked
        end = match.end()
        if end < len(self.text) and (self.text[end].isalnum() or self.text[end] in "_.@"):
            glued = _WORDISH.match(self.text, self.pos)
            assert glued is not None
            line, column = self.src.position(self.pos)
            raise self.src.error(
                f"invalid number {glued.group()!r}; quote values that are not plain numbers",
                line=line,
                column=column,
                token=glued.group(),
            )
        self._emit(TokenKind.NUMBER, end)

    def _paren_or_tag(self) -> None:
        match = _TAG.match(self.text, self.pos)
        if match:
            tag = f"({match.group(2).upper()},{match.group(4).upper()})"
            self._emit(TokenKind.TAG, match.end(), value=tag)
            return
        loose = _TAG_LIKE.match(self.text, self.pos)
        if loose:
            line, column = self.src.position(self.pos)
            raise self.src.error(
                f"invalid tag {loose.group()!r}: expected (gggg,eeee) with four hex digits each",
                line=line,
                column=column,
                token=loose.group(),
            )
        self._emit(TokenKind.LPAREN, self.pos + 1)

    def _string(self) -> None:
        text = self.text
        quote = text[self.pos]
        i = self.pos + 1
        chars: list[str] = []
        while i < len(text):
            ch = text[i]
            if ch == quote:
                self._emit(TokenKind.STRING, i + 1, value="".join(chars))
                return
            if ch in "\r\n":
                break
            if ch == "\\" and i + 1 < len(text) and text[i + 1] not in "\r\n":
                nxt = text[i + 1]
                chars.append(_ESCAPES.get(nxt, "\\" + nxt))
                i += 2
                continue
            chars.append(ch)
            i += 1
        line, column = self.src.position(self.pos)
        rest = self.src.line_text(line)[column - 1 :]
        raise self.src.error(
            f"unterminated string literal (missing closing {quote})",
            line=line,
            column=column,
            token=rest,
        )
