"""Emergency numbers: which dialled numbers bypass ClearIP and are never blocked.

The same normalised form is used by the relay and loaded into the XDP program's emergency map:
the Request-URI user (or tel number) with URI parameters and visual separators removed, digits
only, at most 15 of them (E.164's limit). ``tel:9-1-1;phone-context=...`` and ``sip:911;x@h``
both normalise to ``911``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

MAX_DIGITS = 15
DEFAULT_NUMBERS = ("911", "933")
_VISUAL_SEPARATORS = str.maketrans("", "", "-.() ")


def normalise_number(user: str) -> str:
    """Digits of a dialled number, without parameters and visual separators ('' if not a number)."""
    number = user.split(";", 1)[0].translate(_VISUAL_SEPARATORS)
    if number.startswith("+"):
        number = number[1:]
    if not number.isdigit() or len(number) > MAX_DIGITS or not number.isascii():
        return ""
    return number


def validate_number(text: str) -> str:
    """A configured emergency number: digits only, 1 to 15 of them."""
    number = normalise_number(text)
    if not number or number != text.strip().lstrip("+"):
        raise ValueError(
            f"invalid emergency number {text!r}: use digits only, at most {MAX_DIGITS} (e.g. 911)"
        )
    return number


class EmergencyNumbers:
    """The set of emergency numbers, checked on every INVITE before anything else."""

    def __init__(self, numbers: Iterable[str] = DEFAULT_NUMBERS) -> None:
        self._numbers = frozenset(validate_number(n) for n in numbers)

    def __contains__(self, user: object) -> bool:
        return isinstance(user, str) and normalise_number(user) in self._numbers

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._numbers))

    def numbers(self) -> list[str]:
        return sorted(self._numbers)

    def with_added(self, number: str) -> EmergencyNumbers:
        return EmergencyNumbers([*self._numbers, validate_number(number)])

    def without(self, number: str) -> EmergencyNumbers:
        target = validate_number(number)
        if target not in self._numbers:
            raise ValueError(f"{number} is not an emergency number here")
        return EmergencyNumbers(self._numbers - {target})
