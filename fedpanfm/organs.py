"""The organ vocabulary: the one place that lists which organs fedpanfm knows.

A config may extend the list (``data.extra_organs``); everything that needs organ order
(model embeddings, masks, aggregation weights) takes it from an :class:`OrganSet`, never
from a literal list of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_ORGANS: tuple[str, ...] = (
    "brain",
    "heart",
    "adipose",
    "liver",
    "kidney",
    "spleen",
    "pancreas",
)


@dataclass(frozen=True)
class OrganSet:
    """An ordered organ vocabulary.

    Args:
        names: organ names in the fixed order used for organ ids, masks and embeddings.
    """

    names: tuple[str, ...] = DEFAULT_ORGANS

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate organ names in {self.names}")
        for name in self.names:
            if not name or not name.replace("_", "").isalnum() or name != name.lower():
                raise ValueError(f"organ name {name!r} must be lower-case letters, digits or '_'")

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def index(self, name: str) -> int:
        """Organ id of ``name``; raises ``KeyError`` naming the known organs."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown organ {name!r}; known organs: {', '.join(self.names)}") from None

    @classmethod
    def with_extra(cls, extra: list[str] | tuple[str, ...]) -> "OrganSet":
        """The default organs followed by ``extra`` (a config's ``data.extra_organs``)."""
        return cls(DEFAULT_ORGANS + tuple(e for e in extra if e not in DEFAULT_ORGANS))
