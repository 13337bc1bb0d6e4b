"""Parse, validate and write alloy compositions.

A composition is a mapping of element symbol to atomic fraction (float64,
summing to 1), ordered by atomic number.

`parse` reads formulas with the grammar and semantics of pymatgen's
`Composition` (checked against pymatgen 2026.10.24 in the tests): element
symbols with optional amounts ("Ni3Al", "Al0.3CoCrFeNi", "Fe70Ni30"),
decimal amounts with an optional exponent ("Fe1e-3"), whitespace between
tokens, repeated elements merged ("NiAlNi" is Ni2Al), and groups in (), [] or
{} whose amount multiplies every element inside ("(CoCrFeNi)90Al10" has
Al = 10/370). It is stricter than pymatgen where pymatgen would silently
change the composition. pymatgen reads D and T as H, drops elements whose
amount is 0 (or below 1e-8), and accepts placeholder species such as "X" or
"A", and all of those raise `CompositionError` here. The amounts are
evaluated here instead of by pymatgen, so no small amount is dropped.

With `alloy_notation=True` a group's amount is its share of the alloy, as
high-entropy-alloy papers write it: "(CoCrFeNi)90Al10" is 90 at.% CoCrFeNi,
split equally, and 10 at.% Al. The rules:

- When the formula contains no group, both notations read it the same way,
  so "Al0.3CoCrFeNi" and "Fe70Ni30" mean the same in either.
- Otherwise every top-level part (element or group) needs an explicit share,
  and the shares must sum to 100 (at.%) or to 1 (fractions), within a
  relative tolerance of 1e-3, so rounded shares such as 33.3 + 33.3 + 33.3
  pass. A missing share or another total raises `CompositionError`, because
  the share of a remainder is never inferred.
- Inside a group, the amounts of its members are proportions of the group's
  share (1 where absent): "(Co2Cr)90Al10" has Co = 0.6 and Cr = 0.3. A nested
  group's amount is its proportion of the enclosing group in the same way, so
  "((CoCr)50Fe50)80Al20" has Co = Cr = 0.2, Fe = 0.4 and Al = 0.2.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real

import numpy as np

from dvmrl.elements import ELEMENT_INDEX, is_metal

MAX_ELEMENTS = 8

# Relative tolerance on the total of the top-level shares in alloy notation.
ALLOY_TOTAL_RTOL = 1e-3

# pymatgen's amount syntax: decimals with an optional exponent such as 1e-3.
# Each number has one way to match (no optional dot between two digit runs),
# so patterns that repeat it cannot backtrack exponentially on long inputs.
_NUMBER_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e-?[0-9]+)?")
# Metallurgical alloy names such as Ni-20Cr or Fe-18Cr-8Ni: the balance
# element, then the other elements' shares, usually in weight percent.
_METALLURGICAL_RE = re.compile(
    r"[A-Z][a-z]?(?:-(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[A-Z][a-z]?)+"
)
# The start of such a name as people also write it: Ni-20 Cr, Ni-20wt%Cr,
# Ni-20at.%Cr.
_METALLURGICAL_START_RE = re.compile(
    r"[A-Z][a-z]?\s*-\s*(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:(?:wt|at)\.?\s*)?%?\s*[A-Z]"
)
_METALLURGICAL_REASON = (
    "alloy names with the balance element first (such as Ni-20Cr) are not "
    "read, because their shares are usually weight percent; convert them to "
    "atomic shares and write, for example, Ni80Cr20 for 20 at.% Cr"
)
_ASCII_LETTERS = frozenset(string.ascii_letters)
_NUMBER_START = frozenset("0123456789.")
_LETTERS_RE = re.compile(r"[A-Za-z]+")
# Exponents that _NUMBER_RE does not read, such as the e+3 of 1e+3 or the E3
# of 1E3, where a letter follows a digit.
_EXPONENT_RE = re.compile(r"e\+[0-9]+|E[+-]?[0-9]+")
_SYMBOL_RE = re.compile(r"[A-Z][a-z]*")
_OPENING = {"(": ")", "[": "]", "{": "}"}
_CLOSING = frozenset(_OPENING.values())
_ISOTOPES = {"D": "deuterium", "T": "tritium"}
# Symbols pymatgen accepts beyond the vendored table (Z = 104 .. 118).
_HEAVY = frozenset("Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og".split())


class CompositionError(ValueError):
    """Invalid composition: a formula or mapping dvmrl cannot read.

    Attributes:
        formula: the formula text or a repr of the mapping.
        token: the offending token, or None when the whole input is at fault.
        reason: what is wrong and how to fix it.
    """

    def __init__(self, formula: str, reason: str, token: str | None = None):
        self.formula = formula
        self.token = token
        self.reason = reason
        where = f" at {token!r}" if token is not None else ""
        super().__init__(f"invalid composition {formula!r}{where}: {reason}")


@dataclass
class _Element:
    symbol: str
    amount: float | None
    text: str


@dataclass
class _Group:
    items: list
    amount: float | None
    text: str


def _capitalize_run(run: str) -> str | None:
    """Spell a run of letters as element symbols, or None if impossible.

    Two-letter symbols are tried before one-letter ones, so "NI" becomes "Ni".
    """
    lower = run.lower()
    n = len(lower)
    # width[i]: length of the first symbol of a spelling of lower[i:], 0 at
    # the end, None when lower[i:] has none. Filled from the end, so a run of
    # any length needs no recursion.
    width: list[int | None] = [None] * (n + 1)
    width[n] = 0
    for start in range(n - 1, -1, -1):
        for size in (2, 1):
            candidate = lower[start : start + size].capitalize()
            if (
                len(candidate) == size
                and candidate in ELEMENT_INDEX
                and width[start + size] is not None
            ):
                width[start] = size
                break
    if width[0] is None:
        return None
    symbols = []
    start = 0
    while start < n:
        size = width[start]
        symbols.append(lower[start : start + size].capitalize())
        start += size
    return "".join(symbols)


def _case_suggestion(text: str) -> str | None:
    """Return the formula with each letter run re-capitalised, when possible."""
    pieces = []
    position = 0
    for match in _LETTERS_RE.finditer(text):
        fixed = _capitalize_run(match.group())
        if fixed is None:
            return None
        pieces.append(text[position : match.start()])
        pieces.append(fixed)
        position = match.end()
    pieces.append(text[position:])
    suggestion = "".join(pieces)
    return suggestion if suggestion != text else None


def _has_case_error(run: str) -> bool:
    """Tell whether a letter run shows a letter-case mistake ("NI", "ni")."""
    return run[0].islower() or re.search(r"[A-Z]{2}", run) is not None


def _case_reason(text: str) -> str:
    reason = (
        "wrong letter case: element symbols are one capital letter followed "
        "by at most two lowercase letters (Ni, Al)"
    )
    suggestion = _case_suggestion(text)
    if suggestion is not None:
        reason += f"; did you mean {suggestion!r}?"
    return reason


def element_symbol_problem(symbol: str) -> str | None:
    """Return why ``symbol`` is not an element of the table H .. Lr, or None."""
    if symbol in ELEMENT_INDEX:
        return None
    if symbol.capitalize() in ELEMENT_INDEX:
        return (
            f"unknown element symbol {symbol!r}: symbols are case-sensitive, "
            f"did you mean {symbol.capitalize()!r}?"
        )
    return _symbol_reason(symbol)


def _symbol_reason(symbol: str) -> str:
    """Explain why a capitalised token is not an accepted element symbol."""
    if symbol in _ISOTOPES:
        return (
            f"{symbol!r} is the isotope symbol for {_ISOTOPES[symbol]}, which "
            "pymatgen would read as H; write H"
        )
    if symbol in _HEAVY:
        return (
            f"{symbol!r} is beyond the element table, which covers H .. Lr (Z 1 .. 103)"
        )
    return (
        f"unknown element symbol {symbol!r} (placeholder species such as X are "
        "rejected); use element symbols H .. Lr (Z 1 .. 103)"
    )


def _read_amount(text: str, token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise CompositionError(text, "amount is not finite", token)
    if value == 0.0:
        mantissa = token.split("e")[0]
        if any(digit in mantissa for digit in "123456789"):
            raise CompositionError(
                text,
                "amount is below the smallest positive float64 (about 5e-324) and "
                "reads as zero; scale the amounts up or leave the element out",
                token,
            )
        raise CompositionError(
            text, "amount is zero; leave the element out instead", token
        )
    return value


class _FormulaReader:
    """Reader of formula text into a tree of _Element and _Group items.

    Each `_read_*` method consumes one token at `position` and raises
    CompositionError naming that token when it is invalid.
    """

    def __init__(self, text: str):
        self.text = text
        self.position = 0
        self.items: list = []
        # (enclosing items, opening bracket, its position) per open group.
        self.stack: list[tuple[list, str, int]] = []
        # The last item that may still take an amount (None after an amount).
        self.last: _Element | _Group | None = None

    def error(self, reason: str, token: str | None = None) -> CompositionError:
        return CompositionError(self.text, reason, token)

    def read(self) -> list:
        text = self.text
        while self.position < len(text):
            char = text[self.position]
            if char.isspace():
                self.position += 1
            elif char in _OPENING:
                self._read_opening(char)
            elif char in _CLOSING:
                self._read_closing(char)
            elif char in _ASCII_LETTERS:
                self._read_symbol(char)
            elif char in _NUMBER_START:
                self._read_amount()
            elif char == "-" and _NUMBER_RE.match(text, self.position + 1):
                number = _NUMBER_RE.match(text, self.position + 1).group()
                stripped = text.strip()
                if _METALLURGICAL_RE.fullmatch(stripped) or (
                    _METALLURGICAL_START_RE.match(stripped)
                ):
                    raise self.error(_METALLURGICAL_REASON, "-" + number)
                raise self.error("amount is negative", "-" + number)
            else:
                raise self.error(
                    "invalid character; formulas contain element symbols, "
                    "amounts, brackets and spaces only",
                    char,
                )
        if self.stack:
            _, _, start = self.stack[-1]
            raise self.error("bracket is never closed", text[start:])
        return self.items

    def _read_opening(self, char: str) -> None:
        if len(self.stack) >= MAX_NESTING:
            # The amounts are summed by recursion over the groups, and no
            # chemical formula nests this deep.
            raise self.error(
                f"brackets nest more than {MAX_NESTING} deep; multiply the amounts "
                "out to fewer brackets",
                self.text[self.stack[0][2] : self.position + 1],
            )
        self.stack.append((self.items, char, self.position))
        self.items = []
        self.last = None
        self.position += 1

    def _read_closing(self, char: str) -> None:
        if not self.stack:
            raise self.error("closing bracket without an opening one", char)
        parent, opening, start = self.stack.pop()
        group_text = self.text[start : self.position + 1]
        if _OPENING[opening] != char:
            raise self.error(f"bracket {opening!r} is closed by {char!r}", group_text)
        if not self.items:
            raise self.error("empty group", group_text)
        group = _Group(self.items, None, group_text)
        parent.append(group)
        self.items = parent
        self.last = group
        self.position += 1

    def _read_symbol(self, char: str) -> None:
        exponent = _EXPONENT_RE.match(self.text, self.position)
        if exponent is not None and self.position > 0:
            if self.text[self.position - 1].isdigit():
                raise self.error(
                    "amounts take exponents written as 1e3 or 1e-3 (lowercase e, "
                    "no '+')",
                    exponent.group(),
                )
        if char.islower():
            run = _LETTERS_RE.match(self.text, self.position).group()
            raise self.error(_case_reason(self.text), run)
        symbol_match = _SYMBOL_RE.match(self.text, self.position)
        symbol = symbol_match.group()
        if symbol not in ELEMENT_INDEX:
            # The whole letter run counts: in "FE2NI" the F reads as fluorine,
            # and the case mistake shows only in "FE", not in the "E" that fails.
            start = self.position
            while start > 0 and self.text[start - 1] in _ASCII_LETTERS:
                start -= 1
            run = _LETTERS_RE.match(self.text, self.position).group()
            whole = self.text[start : self.position + len(run)]
            # Only where recapitalising gives a formula: "NiCX" is more likely
            # C and a placeholder X than a case mistake.
            if _has_case_error(whole) and _case_suggestion(self.text) is not None:
                raise self.error(_case_reason(self.text), whole)
            raise self.error(_symbol_reason(symbol), symbol)
        element = _Element(symbol, None, symbol)
        self.items.append(element)
        self.last = element
        self.position = symbol_match.end()

    def _read_amount(self) -> None:
        number_match = _NUMBER_RE.match(self.text, self.position)
        if number_match is None:
            raise self.error("invalid amount", self.text[self.position])
        token = number_match.group()
        if self.last is None:
            raise self.error(
                "amount does not follow an element symbol or a group", token
            )
        self.last.amount = _read_amount(self.text, token)
        self.last.text += token
        self.last = None
        self.position = number_match.end()


# Deepest bracket nesting a formula may have; hydrates and alloy notation
# need two or three levels.
MAX_NESTING = 16


def _sum(values) -> float:
    """Sum floats with math.fsum, returning inf where the sum overflows."""
    try:
        return math.fsum(values)
    except OverflowError:
        return math.inf


def _standard_amounts(items: list, factor: float, amounts: dict[str, float]) -> None:
    for item in items:
        amount = factor * (1.0 if item.amount is None else item.amount)
        if isinstance(item, _Group):
            _standard_amounts(item.items, amount, amounts)
        else:
            amounts[item.symbol] = amounts.get(item.symbol, 0.0) + amount


def _split_share(items: list, share: float, amounts: dict[str, float]) -> None:
    weights = [1.0 if item.amount is None else item.amount for item in items]
    total = _sum(weights)
    if not math.isfinite(total):
        # Finite weights such as 1e308 and 1e308 whose sum overflows: only
        # their ratios count, so scale them below the overflow first.
        largest = max(weights)
        weights = [weight / largest for weight in weights]
        total = _sum(weights)
    for item, weight in zip(items, weights, strict=True):
        part = share * weight / total
        if not math.isfinite(part):
            part = share * (weight / total)
        if isinstance(item, _Group):
            _split_share(item.items, part, amounts)
        else:
            amounts[item.symbol] = amounts.get(item.symbol, 0.0) + part


def _alloy_amounts(text: str, items: list) -> dict[str, float]:
    amounts: dict[str, float] = {}
    if not any(isinstance(item, _Group) for item in items):
        _standard_amounts(items, 1.0, amounts)
        return amounts
    for item in items:
        if item.amount is None:
            raise CompositionError(
                text,
                "in alloy notation every part next to a group needs its share "
                "in at.% or as a fraction, as in '(CoCrFeNi)90Al10'",
                item.text,
            )
    total = _sum(item.amount for item in items)
    # The slack above the tolerance keeps a sum at exactly the tolerance,
    # such as 33.3 * 3 = 99.9 (stored as 99.89999999999999), inside it.
    if not any(
        abs(total - basis) <= ALLOY_TOTAL_RTOL * basis * (1.0 + 1e-9)
        for basis in (100.0, 1.0)
    ):
        raise CompositionError(
            text,
            f"in alloy notation the shares must sum to 100 (at.%) or 1 "
            f"(fractions), but they sum to {total:g}",
        )
    for item in items:
        if isinstance(item, _Group):
            _split_share(item.items, item.amount, amounts)
        else:
            amounts[item.symbol] = amounts.get(item.symbol, 0.0) + item.amount
    return amounts


def _check_metals(formula: str, symbols, case_hint: str | None) -> None:
    non_metals = [symbol for symbol in symbols if not is_metal(symbol)]
    if not non_metals:
        return
    verb = "is not a metal" if len(non_metals) == 1 else "are not metals"
    reason = (
        f"{', '.join(non_metals)} {verb} (pymatgen Element.is_metal, which also "
        "counts the metalloids B, Si, Ge, As, Sb, Te and Po as non-metals) and "
        "this input takes metals only"
    )
    if case_hint is not None:
        reason += f"; if the letter case is wrong, did you mean {case_hint!r}?"
    raise CompositionError(formula, reason, non_metals[0])


def _normalize(formula: str, amounts: dict[str, float]) -> dict[str, float]:
    ordered = sorted(amounts, key=ELEMENT_INDEX.__getitem__)
    if len(amounts) > MAX_ELEMENTS:
        raise CompositionError(
            formula,
            f"{len(amounts)} elements ({', '.join(ordered)}) exceed the maximum "
            f"of {MAX_ELEMENTS}",
        )
    total = _sum(amounts.values())
    if not math.isfinite(total):
        # Finite amounts whose sum overflows (Co1e308Cr1e308): scale them
        # below the overflow, which leaves their fractions as they are.
        largest = max(amounts.values())
        if math.isfinite(largest):
            amounts = {symbol: amount / largest for symbol, amount in amounts.items()}
            total = _sum(amounts.values())
    if not math.isfinite(total):
        raise CompositionError(formula, "the amounts sum to a value that is not finite")
    fractions = {symbol: amounts[symbol] / total for symbol in ordered}
    for symbol, fraction in fractions.items():
        # Products of tiny group amounts can underflow to 0.0.
        if not fraction > 0.0:
            raise CompositionError(
                formula,
                "the amount is too small to represent as a float64 fraction",
                symbol,
            )
    return fractions


@functools.lru_cache(maxsize=65536)
def _parse_cached(
    text: str, alloy_notation: bool, metals_only: bool
) -> tuple[tuple[str, float], ...]:
    stripped = text.strip()
    if not stripped:
        raise CompositionError(text, "empty formula")
    items = _FormulaReader(stripped).read()
    if alloy_notation:
        amounts = _alloy_amounts(stripped, items)
    else:
        amounts = {}
        _standard_amounts(items, 1.0, amounts)
    if metals_only:
        runs = _LETTERS_RE.findall(stripped)
        hint = _case_suggestion(stripped) if any(map(_has_case_error, runs)) else None
        _check_metals(stripped, amounts, hint)
    return tuple(_normalize(stripped, amounts).items())


def parse(
    text: str, alloy_notation: bool = False, metals_only: bool = False
) -> dict[str, float]:
    """Parse a formula into atomic fractions.

    Args:
        text: formula such as "Ni3Al", "Al0.3CoCrFeNi" or "(CoCrFeNi)90Al10".
        alloy_notation: read a group's amount as its share of the alloy
            (module docstring) instead of a multiplier.
        metals_only: reject elements that pymatgen does not call metals.

    Returns:
        {symbol: atomic fraction} in atomic-number order, float64 values
        summing to 1.

    Raises:
        CompositionError: for an empty formula, an unknown, isotope or
            placeholder symbol, wrong letter case, a zero, negative or
            non-finite amount, unbalanced brackets, an inconsistent alloy
            notation, a non-metal with `metals_only`, or more than
            MAX_ELEMENTS elements.
        TypeError: when text is not a string.
    """
    if not isinstance(text, str):
        raise TypeError(f"formula must be a str, got {type(text).__name__}")
    return dict(_parse_cached(text, bool(alloy_notation), bool(metals_only)))


def _mapping_symbol(formula: str, key) -> str:
    # pymatgen Element and Species keys (a Composition is a mapping) carry .symbol.
    symbol = getattr(key, "symbol", key)
    if not isinstance(symbol, str):
        raise TypeError(
            f"composition keys must be element symbols (str), got {type(key).__name__}"
        )
    if symbol in ELEMENT_INDEX:
        return symbol
    if symbol and _LETTERS_RE.fullmatch(symbol) and _has_case_error(symbol):
        fixed = _capitalize_run(symbol)
        reason = "wrong letter case in an element symbol"
        if fixed is not None and fixed in ELEMENT_INDEX:
            reason += f"; did you mean {fixed!r}?"
        raise CompositionError(formula, reason, symbol)
    if not symbol.strip():
        raise CompositionError(formula, "empty element symbol", symbol)
    raise CompositionError(formula, _symbol_reason(symbol), symbol)


def validate(fractions: Mapping, metals_only: bool = False) -> dict[str, float]:
    """Check a {symbol: amount} mapping and normalise it to atomic fractions.

    Args:
        fractions: element symbol (or pymatgen Element) to a positive, finite
            amount in any unit; the amounts are divided by their sum.
        metals_only: reject elements that pymatgen does not call metals.

    Returns:
        {symbol: atomic fraction} in atomic-number order, float64 values
        summing to 1.

    Raises:
        CompositionError: for an empty mapping, an unknown symbol, wrong letter
            case, a zero, negative or non-finite amount, a non-metal with
            `metals_only`, or more than MAX_ELEMENTS elements.
        TypeError: when fractions is not a mapping or contains a value that is
            not a real number.
    """
    if not isinstance(fractions, Mapping):
        raise TypeError(
            f"composition must be a mapping of symbol to amount, got "
            f"{type(fractions).__name__}"
        )
    formula = repr(dict(fractions))
    if not fractions:
        raise CompositionError(formula, "empty composition")
    amounts: dict[str, float] = {}
    for key, value in fractions.items():
        symbol = _mapping_symbol(formula, key)
        # np.number includes complex NumPy scalars, whose float() drops the
        # imaginary part.
        if (
            isinstance(value, bool | np.complexfloating)
            or not isinstance(value, Real | np.number)
        ):
            raise TypeError(
                f"amount of {symbol} must be a real number, got {type(value).__name__}"
            )
        amount = float(value)
        if math.isnan(amount) or math.isinf(amount):
            raise CompositionError(formula, f"amount {amount} is not finite", symbol)
        if amount < 0.0:
            raise CompositionError(formula, f"amount {amount} is negative", symbol)
        if amount == 0.0:
            raise CompositionError(
                formula, "amount is zero; leave the element out instead", symbol
            )
        amounts[symbol] = amounts.get(symbol, 0.0) + amount
    if metals_only:
        _check_metals(formula, amounts, None)
    return _normalize(formula, amounts)


def _as_fractions(composition: Mapping | str) -> dict[str, float]:
    if isinstance(composition, str):
        return parse(composition)
    return validate(composition)


def composition_key(fractions: Mapping[str, float]) -> str:
    """Return the key that identifies a composition among rows of data.

    The symbols are sorted and each atomic fraction is written to 6
    decimals, so one composition written several ways (Ni3Al, Al0.25Ni0.75,
    or Al5Mn7 and a file's rounded Al0.416667Mn0.583333) gets one key.
    Compositions whose fractions all agree to within rounding at 6 decimals
    share a key. Checkpoints store these keys for their training rows.
    """
    # Rounding to 12 significant digits first removes float64 noise, so a
    # fraction at a tie of the sixth decimal (1/128 = 0.0078125 from NiAl127,
    # 0.007812500000000002 from Ni0.1Al12.7) rounds the same way every time.
    return "".join(
        f"{symbol}{float(f'{fractions[symbol]:.12g}'):.6f}"
        for symbol in sorted(fractions)
    )


def format_formula(fractions: Mapping | str, digits: int | None = None) -> str:
    """Write a composition as a formula with plain decimal amounts.

    The amounts are the atomic fractions, in atomic-number order, never in
    exponent notation. By default each is the shortest decimal that reads
    back as the same float64, so `parse(format_formula(c))` returns the
    fractions of `c` to within float64 rounding (about 1e-16).

    Args:
        fractions: {symbol: amount} (normalised first) or a formula string.
        digits (int, optional): round each fraction to this many
            significant digits (trailing zeros dropped), for display, so a
            trace of 1e-5 stays visible. The result then reads back only to
            within that rounding.

    Returns:
        Formula such as "Al0.25Ni0.75".
    """
    if digits is not None and (
        isinstance(digits, bool) or int(digits) != digits or digits < 1
    ):
        raise ValueError(f"digits must be an integer >= 1, got {digits!r}")
    normalised = _as_fractions(fractions)
    if digits is None:
        return "".join(
            f"{symbol}{np.format_float_positional(value, unique=True, trim='-')}"
            for symbol, value in normalised.items()
        )
    amounts = (
        np.format_float_positional(
            value, precision=int(digits), unique=True, fractional=False, trim="-"
        )
        for value in normalised.values()
    )
    pairs = zip(normalised, amounts, strict=True)
    return "".join(f"{symbol}{amount}" for symbol, amount in pairs)


def chemsys(fractions: Mapping | str) -> str:
    """Return the chemical system: the element symbols sorted and joined by '-'.

    Args:
        fractions: {symbol: amount} or a formula string.

    Returns:
        A string such as "Al-Ni" (alphabetical order, as pymatgen writes it).
    """
    return "-".join(sorted(_as_fractions(fractions)))


def reads_as_alloy_notation(formula: str) -> bool:
    """Return True for a grouped formula whose two readings differ.

    In standard notation "(CoCrFeNi)90Al10" has 2.7 at.% Al; as at.% shares
    (``alloy_notation=True``) it has 10, so a formula valid both ways is
    ambiguous. Groups in (), [] and {} count alike. A formula that both
    readings give the same fractions, such as "(FeNi)100", is not ambiguous.
    """
    if not any(bracket in formula for bracket in "([{"):
        return False
    try:
        alloy = parse(formula, alloy_notation=True)
        standard = parse(formula)
    except CompositionError:
        return False
    if alloy.keys() != standard.keys():
        return True
    return any(
        not math.isclose(alloy[symbol], standard[symbol], rel_tol=1e-9, abs_tol=1e-12)
        for symbol in alloy
    )


__all__ = [
    "ALLOY_TOTAL_RTOL",
    "MAX_ELEMENTS",
    "CompositionError",
    "chemsys",
    "format_formula",
    "parse",
    "reads_as_alloy_notation",
    "validate",
]
