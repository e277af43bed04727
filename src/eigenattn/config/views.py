"""The one definition of a view (docs/method.md §2): which queries and keys of an n × n score block
it takes, how many keys d its rows have, and whether a causal model allows it.

- ``all``: every query and every key (d = n). Undefined under a causal mask, where the keys after
  each query are masked, so the planner, the config checks and the moments all ask
  :meth:`View.allowed`.
- ``prefix``: the second half of the queries against the first half of the keys (d = n // 2),
  which every query of a causal model sees.
"""

from __future__ import annotations

from dataclasses import dataclass

from eigenattn.config.schema import enum
from eigenattn.errors import ConfigError

VIEWS = enum("eigen.views")


@dataclass(frozen=True)
class View:
    name: str
    n: int

    def __post_init__(self):
        if self.name not in VIEWS:
            raise ConfigError("eigen.views", f"'{self.name}' is not a view", f"use one of {', '.join(VIEWS)}")

    @property
    def queries(self) -> slice:
        return slice(0, self.n) if self.name == "all" else slice(self.n // 2, self.n)

    @property
    def keys(self) -> slice:
        return slice(0, self.n) if self.name == "all" else slice(0, self.n // 2)

    @property
    def d(self) -> int:
        """Keys per row."""
        return self.keys.stop - self.keys.start

    def allowed(self, causal: bool) -> bool:
        return not (causal and self.name == "all")

    def slices(self, causal: bool) -> tuple[slice, slice]:
        """(query slice, key slice); refused for a view the model's mask does not allow."""
        if not self.allowed(causal):
            raise ConfigError(
                "eigen.views",
                "view 'all' is undefined for a causal model (keys after each query are masked)",
                "use views: auto, or [prefix]",
            )
        return self.queries, self.keys


def view_slices(view: str, n: int, causal: bool) -> tuple[slice, slice]:
    """(query slice, key slice) of ``view`` over an n × n block."""
    return View(view, n).slices(causal)


def allowed_views(causal: bool) -> list[str]:
    """Every view a model with this mask allows, in the schema's order."""
    return [v for v in VIEWS if View(v, 2).allowed(causal)]
