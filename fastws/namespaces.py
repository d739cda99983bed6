"""Channel options per namespace, the part of a channel's name before ``:``.

``chat:42`` is in namespace ``chat``; ``lobby`` is in the default namespace.
The top-level options ``history_size``, ``history_ttl``, ``presence``,
``join_leave`` and ``client_publish`` are the defaults for every channel;
the ``namespaces`` option overrides any of them for the channels of one
namespace, for example a short history for ``cursor:*`` channels,
join/leave messages for ``chat:*`` ones and no client publishing on
``feed:*`` ones. Options are resolved per channel name on each use, which
costs a dict look-up, so they need no per-channel state.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastws.config import Config


@dataclass(frozen=True, slots=True)
class ChannelOptions:
    """What a channel keeps and tells its subscribers."""

    history_size: int  # publications kept for recovery and the history op; 0: none
    history_ttl: float  # seconds a publication stays in the history
    presence: bool  # the presence op answers for the channel
    join_leave: bool  # subscribers get {"ch", "join"|"leave": info} as others come and go
    # Clients may publish with the pub op; without it only the server (App.publish) does.
    client_publish: bool = True


_TYPES: dict[str, type] = {"history_size": int, "history_ttl": float}
_TYPES.update({f.name: bool for f in fields(ChannelOptions) if f.name not in _TYPES})


def parse(value: str | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``namespaces`` option: JSON text (environment, flag) or a TOML table.

    ``{"chat": {"join_leave": true, "presence": true}, "cursor": {"history_size": 0}}``
    """
    table: Any = value
    if isinstance(value, str):
        try:
            table = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(table, Mapping):
        raise ValueError("expected a table of namespaces")
    parsed: dict[str, dict[str, Any]] = {}
    for name, options in table.items():
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"namespace {name!r}: a name is non-empty and has no ':'")
        if not isinstance(options, Mapping):
            raise ValueError(f"namespace {name!r}: expected a table of options")
        parsed[name] = {key: _checked(name, key, v) for key, v in options.items()}
    return parsed


def _checked(namespace: str, key: str, value: Any) -> Any:
    kind = _TYPES.get(key)
    where = f"namespace {namespace!r}: {key}"
    if kind is None:
        known = ", ".join(sorted(_TYPES))
        raise ValueError(f"namespace {namespace!r}: unknown option {key!r} (known: {known})")
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{where}: expected a number, at least 0")
    if kind is int and value != int(value):
        raise ValueError(f"{where}: expected a whole number")
    return kind(value)


# The metrics label of channels outside every configured namespace.
DEFAULT_LABEL = "default"


class Namespaces:
    """Resolves a channel's options; one per node, built from its config."""

    def __init__(self, config: Config) -> None:
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Take the options of a (changed) config; channels made earlier keep their sizes."""
        self.default = ChannelOptions(
            config.history_size,
            config.history_ttl,
            config.presence,
            config.join_leave,
            config.client_publish,
        )
        self._by_name = {
            name: replace(self.default, **options) for name, options in config.namespaces.items()
        }

    def __call__(self, channel: str) -> ChannelOptions:
        name, colon, _ = channel.partition(":")
        if not colon:
            return self.default
        return self._by_name.get(name, self.default)

    def label(self, channel: str) -> str:
        """The namespace a channel counts under in metrics: a configured one, else ``default``.

        Only configured names become labels, so that clients inventing
        prefixes cannot grow the number of series.
        """
        name, colon, _ = channel.partition(":")
        return name if colon and name in self._by_name else DEFAULT_LABEL

    def labels(self) -> list[str]:
        """Every label :meth:`label` may give."""
        return list(dict.fromkeys([DEFAULT_LABEL, *self._by_name]))

    def shortest_ttl(self) -> float:
        """The shortest history TTL of any namespace: how often history needs sweeping."""
        return min(o.history_ttl for o in (self.default, *self._by_name.values()))
