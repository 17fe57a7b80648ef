"""Final answers of rollouts: `\\boxed{...}` extraction, normalisation, matching (spec section 2).

Matching is normalised string equality, else equal values: exactly equal after sympy's automatic
simplification, else equal to 50 digits at three fixed random points (a numeric identity test with
bounded time, unlike `sympy.simplify`). The values come from a small LaTeX subset, read by a
hand-written recursive-descent parser that builds sympy objects directly:
no `eval`, no `sympify` of strings (sympy's `parse_expr` evaluates Python code), and no
`sympy.parsing.latex` (needs antlr4 4.11 exactly; not a dependency of this project). Anything the
parser does not know (other commands, sets, intervals, tuples) is compared as a string only.

Grammar (whitespace ignored):
    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "\\cdot" | "\\times" | "/" | "\\div") unary | implicit unary)*
    unary  := ("-" | "+") unary | power
    power  := atom ("^" arg)?          sizes bounded: see `_power`
    atom   := number | letter | "\\pi" | "(" expr ")" | group
            | "\\frac" arg arg | "\\sqrt" ("[" expr "]")? arg
    group  := "{" expr "}"      arg := group | one digit or letter (as in "\\frac12")
Numbers are exact: "0.5" is the rational 1/2.
"""

from __future__ import annotations

import random
import re

import sympy

MAX_ANSWER_CHARS = 200
MAX_EXPONENT = 1000
MAX_POWER_BITS = 100_000
MAX_ROOT_BITS = 1000
_PRECISION = 50  # digits of the numeric identity test
_TOLERANCE = sympy.Float("1e-30")  # relative
_NOISE = sympy.Float("1e-100")  # what evalf leaves of a value that is exactly 0

_TEXT_COMMANDS = re.compile(
    r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}"
)
_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~|\\left|\\right|\\displaystyle")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree|°")
_THOUSANDS = re.compile(r"(?<=\d)(?:,|\{,\})(?=\d{3}(?!\d))")
_LEADING_VARIABLE = re.compile(r"^\s*[A-Za-z]\s*=\s*(?=[^=]+$)")
_UNDEFINED = (sympy.zoo, sympy.nan, sympy.oo, -sympy.oo)


def extract_boxed_answer(text: str) -> str | None:
    """Content of the first brace-balanced `\\boxed{...}` in `text`, stripped.

    None when there is none, when its braces never close (a truncated rollout) or when it is
    empty. For forced answers (the prompt ends with `\\boxed{`), pass `"\\boxed{" + completion`.
    """
    start = text.find("\\boxed{")
    if start == -1:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip() or None
    return None


def _clean(answer: str) -> str:
    """Normalisation that keeps case and spacing (the parser's input)."""
    s = answer.strip().strip("$").strip()
    for _ in range(3):  # nested \text{\textbf{...}}
        s = _TEXT_COMMANDS.sub(r"\1", s)
    s = _SPACING.sub(" ", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "")
    s = _THOUSANDS.sub("", s)
    s = _LEADING_VARIABLE.sub("", s)
    return s.strip().rstrip(".").strip()


def normalize_answer(answer: str) -> str:
    """Canonical string form of an answer, used for equality and answer distributions.

    Strips `$`, a trailing period, `\\text{}`-like wrappers, spacing commands, `\\left`/`\\right`,
    degrees, percent signs, thousands separators ("282,240" and "282{,}240" -> "282240") and a
    single-letter left-hand side ("x = 3" -> "3"); maps `\\dfrac`/`\\tfrac` to `\\frac`; then
    lower-cases and removes all whitespace.
    """
    return re.sub(r"\s+", "", _clean(answer)).lower()


def _power(base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
    """base^exponent, refusing what sympy would take long to build: numeric exponents above
    1000, exact powers above 100k bits, roots of exact numbers above 1000 bits (sympy factors
    them)."""
    if exponent.is_Number and abs(exponent) > MAX_EXPONENT:
        raise ValueError("exponent too large")
    if base.is_Rational:
        bits = max(abs(base.p).bit_length(), abs(base.q).bit_length())
        if exponent.is_Integer and bits * abs(exponent) > MAX_POWER_BITS:
            raise ValueError("number too large")
        if not exponent.is_Integer and bits > MAX_ROOT_BITS:
            raise ValueError("root of a number too large")
    return sympy.Pow(base, exponent)


class _Parser:
    _TOKEN = re.compile(r"\s*(\\[A-Za-z]+|\d+\.\d*|\.\d+|\d+|[A-Za-z]|[-+*/^(){}\[\]])")

    def __init__(self, text: str):
        self.tokens, pos = [], 0
        text = text.rstrip()
        while pos < len(text):
            match = self._TOKEN.match(text, pos)
            if match is None:
                raise ValueError(f"unexpected character at {pos}")
            self.tokens.append(match.group(1))
            pos = match.end()
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise ValueError(f"expected {expected or 'more input'}, got {token}")
        self.i += 1
        return token

    def parse(self) -> sympy.Expr:
        value = self.expr()
        if self.peek() is not None:
            raise ValueError(f"unexpected {self.peek()}")
        return value

    def expr(self) -> sympy.Expr:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def _starts_atom(self, token: str | None) -> bool:
        return token is not None and (
            token[0].isdigit() or token[0] == "." or token.isalpha()
            or token in ("(", "{", "\\frac", "\\sqrt", "\\pi")
        )

    def term(self) -> sympy.Expr:
        value = self.unary()
        while True:
            token = self.peek()
            if token in ("*", "\\cdot", "\\times"):
                self.take()
                value = value * self.unary()
            elif token in ("/", "\\div"):
                self.take()
                value = value / self.unary()
            elif self._starts_atom(token) and not (token[0].isdigit() and value.is_Number):
                value = value * self.power()  # implicit product: 2x, 3\pi, 2\sqrt{3}, (a)(b)
            else:
                return value

    def unary(self) -> sympy.Expr:
        if self.peek() in ("-", "+"):
            return -self.unary() if self.take() == "-" else self.unary()
        return self.power()

    def power(self) -> sympy.Expr:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        return _power(base, self.argument())  # "x^{10}"; "x^23" is x^2 * 3 as in LaTeX

    def group(self) -> sympy.Expr:
        self.take("{")
        value = self.expr()
        self.take("}")
        return value

    def argument(self) -> sympy.Expr:
        if self.peek() == "{":
            return self.group()
        token = self.take()
        if len(token) == 1 and token.isalnum():
            return sympy.Integer(token) if token.isdigit() else sympy.Symbol(token)
        if token[0].isdigit():  # "\frac12": the argument is one digit
            self.tokens[self.i - 1 : self.i] = [token[0], token[1:]] if len(token) > 1 else [token]
            return sympy.Integer(token[0])
        raise ValueError(f"bad argument {token}")

    def atom(self) -> sympy.Expr:
        token = self.take()
        if token[0].isdigit() or token[0] == ".":
            return sympy.Rational(token)
        if token.isalpha():
            return sympy.Symbol(token)
        if token == "\\pi":
            return sympy.pi
        if token == "(":
            value = self.expr()
            self.take(")")
            return value
        if token == "{":
            self.i -= 1
            return self.group()
        if token == "\\frac":
            numerator = self.argument()
            return numerator / self.argument()
        if token == "\\sqrt":
            index = sympy.Integer(2)
            if self.peek() == "[":
                self.take("[")
                index = self.expr()
                self.take("]")
            return _power(self.argument(), 1 / index)
        raise ValueError(f"unsupported {token}")


def parse_answer(answer: str) -> sympy.Expr | None:
    """Sympy expression of an answer in the grammar above, or None when it is outside it."""
    text = _clean(answer)
    if not text or len(text) > MAX_ANSWER_CHARS:
        return None
    try:
        return _Parser(text).parse()
    except (ValueError, ZeroDivisionError, TypeError, ArithmeticError):
        return None


def _same_value(x: sympy.Expr, y: sympy.Expr) -> bool:
    """x == y: exactly equal after sympy's automatic simplification (final for two rationals),
    else equal at three fixed random points in (1, 2]^symbols, where evalf (adaptive precision,
    50 digits) finds |x - y| below 1e-30 (|x| + |y|) + 1e-100. A numeric identity test, never
    `simplify`, whose time has no bound (it would expand (x+1)^1000)."""
    if x - y == 0:
        return True
    if x.is_Rational and y.is_Rational:  # exact numbers: the exact answer is final
        return False
    points = random.Random(0)
    symbols = sorted(x.free_symbols | y.free_symbols, key=str)
    try:
        for _ in range(3):
            values = {s: sympy.Rational(points.randint(1, 10**6), 10**6) + 1 for s in symbols}
            gap = sympy.Abs((x - y).evalf(_PRECISION, subs=values))
            scale = sum(sympy.Abs(v.evalf(_PRECISION, subs=values)) for v in (x, y))
            bound = _TOLERANCE * scale + _NOISE
            if not gap.is_number or gap.has(*_UNDEFINED) or bool(gap > bound):
                return False
    except (TypeError, ValueError, ArithmeticError):  # not comparable, or not a number
        return False
    return True


def answers_match(a: str | None, b: str | None) -> bool:
    """True when two answers are the same: equal normalised strings, else equal expressions."""
    if a is None or b is None:
        return False
    if normalize_answer(a) == normalize_answer(b):
        return True
    x, y = parse_answer(a), parse_answer(b)
    if x is None or y is None or x.has(*_UNDEFINED) or y.has(*_UNDEFINED):
        return False
    return _same_value(x, y)
