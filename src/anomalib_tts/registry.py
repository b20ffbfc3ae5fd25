"""A name -> class registry, so a new strategy is one decorated class, not an if-chain."""

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes of one kind (pseudo-labelers, classifiers, feature providers).

    Args:
        kind: What the entries are, used in error messages ("classifier", ...).

    Example:
        >>> classifiers = Registry("classifier")
        >>> @classifiers.register("svm")
        ... class Svm: ...
        >>> classifiers.get("svm") is Svm
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        """Return a class decorator that registers the class under ``name``."""

        def decorator(cls: type[T]) -> type[T]:
            if name in self._entries:
                msg = f"{self.kind} {name!r} is already registered"
                raise ValueError(msg)
            self._entries[name] = cls
            return cls

        return decorator

    def get(self, name: str) -> type[T]:
        """Return the class registered as ``name``; a ``ValueError`` lists the valid names otherwise."""
        try:
            return self._entries[name]
        except KeyError:
            msg = f"unknown {self.kind} {name!r}; choose one of {sorted(self._entries)}"
            raise ValueError(msg) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))
