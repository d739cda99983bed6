"""One table of options, read from TOML, ``FASTWS_*`` variables and CLI flags.

Every option has a single name: ``max_message_size`` in TOML,
``FASTWS_MAX_MESSAGE_SIZE`` in the environment and ``--max-message-size`` on
the command line, and a single default: the field default of :class:`Config`.
A flag beats the environment, which beats the file, which beats the default.
``docs/configuration.md`` is printed from the same table
(``fastws options``), so the docs cannot drift from the code.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from fastws import forwarded, namespaces, origins, tls


@dataclass(frozen=True)
class Config:
    """Resolved settings of one node. Field names are the option names."""

    host: str = "0.0.0.0"
    port: int = 8080
    path: str = "/ws"
    tls_cert: str = ""
    tls_key: str = ""
    workers: int = 1
    max_message_size: int = 65536
    handshake_timeout: float = 5.0
    close_timeout: float = 2.0
    ping_interval: float = 25.0
    ping_timeout: float = 20.0
    max_connections: int = 0
    max_connections_per_ip: int = 0
    trusted_proxies: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)
    rate_limit: float = 1000.0
    rate_burst: int = 1000
    max_bad_commands: int = 10
    max_send_buffer: int = 1048576
    drain_period: float = 10.0
    history_size: int = 100
    history_ttl: float = 300.0
    presence: bool = False
    join_leave: bool = False
    client_publish: bool = True
    namespaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    redis: str = ""
    redis_cluster: str = ""
    compression: bool = False
    compression_min_size: int = 256
    compression_level: int = 6
    token_secret: str = ""
    token_public_key: str = ""
    token_audience: str = ""
    token_issuer: str = ""
    token_leeway: float = 5.0
    api_port: int = 0
    api_host: str = "127.0.0.1"
    api_key: str = ""
    node_name: str = ""
    log_level: str = "info"
    log_format: str = "text"


HELP = {
    "host": "Address to listen on.",
    "port": "TCP port for WebSocket upgrades and the HTTP endpoints.",
    "path": "Path of the channel-protocol WebSocket endpoint.",
    "tls_cert": "PEM file of the certificate (chain first) to serve `wss://` and "
    "`https://` with, in the process: TLS 1.2 and 1.3 only, ECDHE with AEAD ciphers "
    "only, session tickets on (docs/tls.md). Needs `tls_key`. Empty: plain TCP, for a "
    "node behind a proxy that terminates TLS, as most are.",
    "tls_key": "PEM file of the private key of `tls_cert`.",
    "workers": "Processes `fastws serve` runs on the port, each binding it with "
    "SO_REUSEPORT so that the kernel spreads connections over them, under a supervisor "
    "that restarts any that dies (docs/workers.md). More than 1 needs `redis`, which "
    "carries publications between them.",
    "max_message_size": "Largest message a client may send, in bytes; a larger one closes "
    "the connection with 1009.",
    "handshake_timeout": "Seconds a new TCP connection has to complete the WebSocket "
    "upgrade before it is dropped.",
    "close_timeout": "Seconds to wait for the client's answer to a close frame before the "
    "TCP connection is cut.",
    "ping_interval": "Seconds without a frame from a client before the node pings it.",
    "ping_timeout": "Seconds a pinged client has to send anything (its pong) before its TCP "
    "connection is cut.",
    "max_connections": "WebSocket connections this node holds at most; past it upgrades get "
    "HTTP 503. 0: no limit.",
    "max_connections_per_ip": "Connections one client address may hold at most; past it "
    "upgrades get HTTP 429. 0: no limit.",
    "trusted_proxies": "Addresses and CIDR blocks of the proxies in front of the node, "
    "e.g. `10.0.0.0/8, 192.168.1.7`: only from a peer among them are X-Forwarded-For "
    "and X-Real-IP believed, the client being the right-most address in "
    "X-Forwarded-For that is not itself a trusted proxy. Per-address limits and logs "
    "use that address. Empty: the headers are ignored and the client is the TCP peer. "
    "A list in TOML, comma-separated in the environment and on the command line.",
    "allowed_origins": "Web pages on other sites that may open WebSockets to the node, "
    "by their Origin, e.g. `https://app.example.com, https://*.example.com` (`*` stands "
    "for part of a host name, or for a port). An upgrade with no Origin (not a "
    "browser) or with the node's own (its host and port are the request's Host) is "
    "always accepted; any other is refused with HTTP 403, which stops cross-site "
    "WebSocket hijacking. `*` accepts every origin, knowingly (docs/origins.md). A "
    "list in TOML, comma-separated in the environment and on the command line.",
    "rate_limit": "Channel-protocol commands per second a connection may send (token bucket); "
    "past it commands are refused with limit_exceeded. 0: no limit.",
    "rate_burst": "Size of the rate-limit bucket; a connection refused this many times without "
    "backing off is closed with 1008.",
    "max_bad_commands": "Malformed commands a connection may send (one forgiven per second) "
    "before it is closed with 1008.",
    "max_send_buffer": "Bytes queued for one connection in the node (its outbox and transport "
    "buffer) past which it is a slow consumer and is closed with 1013. 0: no limit.",
    "drain_period": "Seconds over which a draining node spreads the 1001 closes of its "
    "connections, so that clients do not all reconnect at once.",
    "history_size": "Publications each channel keeps for recovery and the history op; "
    "0 keeps none.",
    "history_ttl": "Seconds a publication stays in its channel's history.",
    "presence": "Answer the presence op (who is subscribed) for channels.",
    "join_leave": "Send a channel's subscribers a join or leave message when a client "
    "subscribes or leaves.",
    "client_publish": "Let clients publish with the pub op; false leaves publishing to the "
    "server (App.publish), and clients get forbidden. Usually set per namespace.",
    "namespaces": "Channel options per namespace (the part of a channel name before ':'), "
    "overriding history_size, history_ttl, presence, join_leave and client_publish: a "
    "table per namespace in TOML, the same as JSON in the environment and on the command "
    "line, e.g. "
    '`{"chat": {"presence": true, "join_leave": true}, "cursor": {"history_size": 0}}`.',
    "redis": "URL of the Redis that carries publications between nodes, keeps their "
    "history and presence, e.g. `redis://127.0.0.1:6379/0` (`rediss://` for TLS, "
    "`redis://:password@host`); needs the `redis` extra. Empty: the embedded in-memory "
    "broker, for a single node.",
    "redis_cluster": "URL of one node of a Redis Cluster to use instead of a single Redis, "
    "e.g. `redis://10.0.0.1:7000`; the others are found from it. Channels spread over "
    "the shards by hash slot and travel by sharded pub/sub (docs/redis.md). Not "
    "together with `redis`.",
    "compression": "Offer permessage-deflate (RFC 7692) to clients that ask for it.",
    "compression_min_size": "Messages smaller than this many bytes are sent uncompressed.",
    "compression_level": "zlib level, 1 (fastest) to 9 (smallest); a publication is "
    "compressed once for all of its subscribers.",
    "token_secret": "Shared secret (at least 32 bytes) that clients' JWTs are signed with, "
    "HS256, HS384 or HS512; every upgrade then needs a valid token (docs/auth.md). Prefer "
    "the environment or the file to the flag, which ps shows. Empty, with no "
    "token_public_key: the node is open to anyone.",
    "token_public_key": "Path of a PEM public key (or certificate) that clients' JWTs are "
    "checked with: RSA (RS*, PS*) or EC (the ES* of its curve). Not together with "
    "token_secret.",
    "token_audience": "The `aud` a token must name; empty: `aud` is not checked.",
    "token_issuer": "The `iss` a token must carry; empty: `iss` is not checked.",
    "token_leeway": "Seconds of clock difference allowed when checking `exp` and `nbf`; "
    "a connection is closed this long after its token's `exp`.",
    "api_port": "TCP port of the server HTTP API, for backends: publish, broadcast, "
    "presence, history, disconnect a user, info (docs/api.md). Needs `api_key`. 0: no API.",
    "api_host": "Address the server API listens on. The loopback address by default, so "
    "that only the same host (or pod) reaches it; set a private address, or `0.0.0.0` "
    "behind a firewall, for backends elsewhere. Never the internet: the API can publish "
    "anywhere and close any user's connections.",
    "api_key": "The key the server API wants in `Authorization: Bearer <key>` or "
    "`X-API-Key: <key>`, at least 32 characters (`openssl rand -hex 32`); required with "
    "`api_port`. Prefer the environment or the file to the flag, which ps shows.",
    "node_name": "Name of this node in welcome frames; empty means host name and pid.",
    "log_level": "Logging level: debug, info, warning or error.",
    "log_format": "`text` for people, or `json`: one object per line with time, level, "
    "logger and message, and on lines about a connection its client id, user, remote "
    "address and trace id (taken from a W3C `traceparent` header on the upgrade, or made "
    "up, and sent in the welcome frame) (docs/observability.md).",
}


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


_bool.__name__ = "bool"


def _strings(value: Any) -> list[str]:
    """A list option: a TOML array of strings, or comma-separated text (env, flag)."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        items = value
    else:
        raise ValueError("expected a list of strings, or one string of comma-separated items")
    return [item.strip() for item in items if item.strip()]


_strings.__name__ = "list"
_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "int": int,
    "float": float,
    "bool": _bool,
    "dict[str, dict[str, Any]]": namespaces.parse,
    "list[str]": _strings,
}
# Parsers that take a TOML table or array as it is, and say themselves what is wrong.
_TABLES = {namespaces.parse, _strings}


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str

    @property
    def env(self) -> str:
        return "FASTWS_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = tuple(
    Option(
        f.name,
        _PARSERS[str(f.type)],
        f.default if f.default_factory is MISSING else f.default_factory(),
        HELP[f.name],
    )
    for f in fields(Config)
)
_BY_NAME = {option.name: option for option in OPTIONS}


class ConfigError(ValueError):
    """A setting that cannot be used, named by where it came from."""


def _convert(option: Option, value: Any, source: str) -> Any:
    """Parse a string, or check a TOML value already typed."""
    if option.parse in _TABLES:
        try:
            return option.parse(value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {option.name}: {exc}") from None
    if isinstance(value, bool) and option.parse is _bool:
        return value
    if not isinstance(value, str):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {option.name}: expected {option.parse.__name__}")
        value = str(value)
    try:
        return option.parse(value)
    except ValueError:
        raise ConfigError(
            f"{source}: {option.name}: {value!r} is not a valid {option.parse.__name__}"
        ) from None


def load(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Config:
    """Resolve every option: flag, then environment, then TOML file, then default."""
    environ = os.environ if environ is None else environ
    config_file = config_file or environ.get("FASTWS_CONFIG") or None
    values: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                table = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{config_file}: {exc}") from None
        for key, value in table.items():
            if key not in _BY_NAME:
                raise ConfigError(f"{config_file}: unknown option {key!r}")
            values[key] = _convert(_BY_NAME[key], value, config_file)
    for option in OPTIONS:
        if option.env in environ:
            values[option.name] = _convert(option, environ[option.env], option.env)
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = _convert(_BY_NAME[name], value, _BY_NAME[name].flag)
    config = Config(**values)
    _check(config)
    return config


_RANGES = {
    "port": (0, 65535),
    "api_port": (0, 65535),
    "workers": (1, None),
    "max_message_size": (1, None),
    "compression_level": (0, 9),
    "compression_min_size": (0, None),
    "max_send_buffer": (0, None),
    "max_connections": (0, None),
    "max_connections_per_ip": (0, None),
    "rate_burst": (1, None),
    "max_bad_commands": (0, None),
    "history_size": (0, None),
}


def _check(config: Config) -> None:
    """Refuse values that parse but cannot work, before the node starts."""
    for name, (low, high) in _RANGES.items():
        value = getattr(config, name)
        if value < low or (high is not None and value > high):
            bound = f"{low} to {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"{name}: {value} is out of range ({bound})")
    for name in (
        "handshake_timeout",
        "close_timeout",
        "ping_interval",
        "ping_timeout",
        "rate_limit",
        "drain_period",
        "history_ttl",
        "token_leeway",
    ):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name}: must not be negative")
    _check_edge(config)
    _check_api(config)
    if config.log_level.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(
            f"log_level: {config.log_level!r} is not one of debug, info, warning, error"
        )
    if config.log_format not in ("text", "json"):
        raise ConfigError(f"log_format: {config.log_format!r} is not text or json")
    if config.workers > 1 and config.port == 0:
        raise ConfigError("workers: processes sharing a port need a fixed port, not 0")
    if config.redis and config.redis_cluster:
        raise ConfigError(
            "redis and redis_cluster are both set; a node uses one backplane: set "
            "redis for a single Redis, redis_cluster for a Redis Cluster"
        )
    if config.workers > 1 and not (config.redis or config.redis_cluster):
        raise ConfigError(
            f"workers: {config.workers} processes need redis (or redis_cluster) set, to "
            "carry publications between them; without it each would be a node of its own "
            "whose clients never see the others' publications"
        )
    # The token key is read now, so that a node with a key it cannot use
    # refuses to start instead of starting open or refusing every client.
    from fastws import auth

    try:
        auth.verifier(config)
    except auth.BadKey as exc:
        raise ConfigError(str(exc)) from None


def _check_edge(config: Config) -> None:
    """Origins, proxies and TLS files: refused here, named, rather than at the first client."""
    for pattern in config.allowed_origins:
        try:
            origins.check_pattern(pattern)
        except ValueError as exc:
            raise ConfigError(f"allowed_origins: {exc}") from None
    for cidr in config.trusted_proxies:
        try:
            forwarded.parse_network(cidr)
        except ValueError as exc:
            raise ConfigError(f"trusted_proxies: {exc}") from None
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("tls_cert and tls_key go together: set both, or neither")
    if config.tls_cert:
        try:
            tls.server_context(config.tls_cert, config.tls_key)
        except ValueError as exc:
            raise ConfigError(f"tls_cert: {exc}") from None


# The shortest server API key accepted: as long as a token secret must be.
MIN_API_KEY = 32


def _check_api(config: Config) -> None:
    """The server API (fastws.api) is never started without a key worth the name."""
    if config.api_port and not config.api_key:
        raise ConfigError(
            "api_port: the server API needs api_key (FASTWS_API_KEY), the key its callers "
            "present; without one anyone who reaches the port could publish and disconnect"
        )
    if config.api_key and len(config.api_key) < MIN_API_KEY:
        raise ConfigError(
            f"api_key: {len(config.api_key)} characters is too short to guess safely; "
            f"use at least {MIN_API_KEY} (openssl rand -hex 32)"
        )
    if config.api_port and config.api_port == config.port:
        raise ConfigError(
            f"api_port: {config.api_port} is the WebSocket port; the API needs a port of its own"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per option; flag defaults stay None so that lower layers show through."""
    parser.add_argument("--config", metavar="FILE", help="TOML file of options (FASTWS_CONFIG).")
    for option in OPTIONS:
        parser.add_argument(
            option.flag,
            dest=option.name,
            metavar=option.name.upper(),
            # A boolean flag alone means true: `--compression`.
            nargs="?" if option.parse is _bool else None,
            const="true" if option.parse is _bool else None,
            help=f"{option.help} ({option.env}, default {option.default!r})",
        )


def from_args(args: argparse.Namespace) -> Config:
    return load({o.name: getattr(args, o.name) for o in OPTIONS}, config_file=args.config)


_DOC_HEADER = """\
# Configuration

Every option has one name in the TOML file (`--config FILE` or
`FASTWS_CONFIG`), the environment and the command line, and one default.
A flag beats the environment, which beats the file, which beats the
default. This page is printed by `fastws options`, and a test keeps the two
the same.

"""


def markdown() -> str:
    """docs/configuration.md: every option as a row of a Markdown table."""
    rows = [
        "| TOML key | environment | flag | default | meaning |",
        "|---|---|---|---|---|",
    ]
    rows += [
        f"| `{o.name}` | `{o.env}` | `{o.flag}` | `{o.default!r}` | {o.help} |" for o in OPTIONS
    ]
    return _DOC_HEADER + "\n".join(rows) + "\n"
