"""A name -> class registry, so a new strategy is one decorated class, not an if-chain."""

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes of one kind of component (pseudo-label recipes, feature sources, classifiers).

    Args:
        kind: What the entries are, used in error messages ("classifier", ...).
        methods: What a component of this kind must have (checked by :meth:`create`).

    Example:
        >>> classifiers = Registry("classifier", methods=("fit",))
        >>> @classifiers.register("svm")
        ... class Svm:
        ...     def fit(self): ...
        >>> classifiers.get("svm") is Svm
        True
        >>> type(classifiers.create("svm")).__name__
        'Svm'
    """

    def __init__(self, kind: str, methods: tuple[str, ...] = ("__call__",)) -> None:
        self.kind = kind
        self.methods = methods
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
            msg = (
                f"unknown {self.kind} {name!r}; choose one of {sorted(self._entries)}, or pass a {self.kind} object "
                "(in YAML: class_path + init_args)"
            )
            raise ValueError(msg) from None

    def create(self, component: "str | T") -> T:
        """The component itself, or a new instance, with default arguments, of the class registered as ``component``.

        Raises:
            ValueError: ``component`` is an unknown name, a class instead of an instance, a ``class_path`` mapping
                that nothing instantiated, or an object without the methods of its kind.
        """
        if isinstance(component, str):
            return self.get(component)()
        if isinstance(component, type):
            msg = f"{self.kind} must be a name or an instance, got the class {component.__name__}: pass an instance"
            raise ValueError(msg)
        if isinstance(component, Mapping):
            msg = (
                f"{self.kind} {dict(component)!r} is a mapping: a class_path + init_args entry is instantiated by "
                "anomalib's CLI (jsonargparse) or by TestTimeSegmentation.from_init_args, not by the class itself"
            )
            raise ValueError(msg)
        missing = [method for method in self.methods if not callable(getattr(component, method, None))]
        if missing:
            msg = f"{self.kind} {component!r} has no {', '.join(missing)}: pass a registered name or such an object"
            raise ValueError(msg)
        return component

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))
