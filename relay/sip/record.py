"""A base for the small value classes made per message (actions, effects, Via, URIs, addresses).

They were dataclasses. mypyc compiles a class's own methods, but the methods ``@dataclass``
generates stay interpreted: constructing a frozen dataclass cost ~0.7 us against ~0.08 us for a
compiled ``__init__``, and the core makes a dozen such objects per message. So these classes
write their ``__init__`` (attributes annotated ``Final`` when the value is immutable: mypy
rejects an assignment, and compiled code refuses it at run time) and list their fields in
``FIELDS``; :class:`Record` gives them what the dataclass did besides: equality with an object
of the same class and equal fields, a hash for immutable ones, and the ``Name(field, ...)``
repr (the tests compare actions and print them).
"""

from __future__ import annotations

from typing import ClassVar


class Record:
    """Equality, repr and (when ``HASHABLE``) hash by the fields named in ``FIELDS``."""

    __slots__ = ()
    FIELDS: ClassVar[tuple[str, ...]] = ()
    HASHABLE: ClassVar[bool] = True

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.FIELDS)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Record)
        return self._values() == other._values()

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        if not self.HASHABLE:
            raise TypeError(f"unhashable type: '{type(self).__name__}'")
        return hash((type(self).__name__, *self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS)
        return f"{type(self).__name__}({fields})"
