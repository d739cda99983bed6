"""Who a client is and what it may do: JWTs checked at the upgrade and on refresh.

With ``token_secret`` (HMAC) or ``token_public_key`` (RSA or EC, a PEM
file) set, every WebSocket upgrade must carry a JWT, as the ``token`` query
parameter or an ``Authorization: Bearer`` header. :class:`Verifier` checks
it synchronously, from the request alone, so that :meth:`fastws.node.Node.route`
can answer 401 before the upgrade; what it yields is a :class:`Grant`: the
user id (``sub``), the expiry (``exp``) and the channel patterns the token
allows (``subs`` and ``pubs``). docs/auth.md says why each choice was made.

The key decides the algorithms, never the token: a secret accepts HS256,
HS384 and HS512, an RSA key RS* and PS*, an EC key the one ES* of its
curve. ``none`` is never accepted, nor HS* with a public key (the classic
confusion where the public key is used as an HMAC secret).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import jwt

if TYPE_CHECKING:
    from picows import WSUpgradeRequest

    from fastws.config import Config

# Claims that carry channel patterns: what the holder may subscribe to (and
# read with history and presence) and publish to.
SUBSCRIBE_CLAIM = "subs"
PUBLISH_CLAIM = "pubs"

# A token longer than this is refused unread: real ones are well under 2 KB.
MAX_TOKEN_LENGTH = 8192

# RFC 7518 3.2: an HMAC key at least as long as the hash output (HS256: 32 bytes).
MIN_SECRET_BYTES = 32
MIN_RSA_BITS = 2048

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class BadKey(ValueError):
    """A configured key that cannot be used; the node does not start."""


class Unauthorized(Exception):
    """A token that is missing or not valid; ``str()`` is safe to tell the client."""


def match(pattern: str, channel: str) -> bool:
    """Whether channel matches pattern, where ``*`` stands for any run of characters.

    Every other character, ``?``, ``[`` and ``:`` included, stands for
    itself, and ``*`` may span ``:``: ``chat:*`` matches ``chat:42`` and
    ``chat:a:b``, ``*`` matches every channel. The check is a few string
    searches (no regular expression, so no pattern can make it slow).
    """
    parts = pattern.split("*")
    if len(parts) == 1:
        return pattern == channel
    head, tail = parts[0], parts[-1]
    if len(channel) < len(head) + len(tail):
        return False
    if not channel.startswith(head) or not channel.endswith(tail):
        return False
    # The middle pieces in order, each as early as it occurs: for a pattern
    # whose only wildcard is `*`, taking the leftmost occurrence never loses
    # a match that a later one would have found.
    pos, end = len(head), len(channel) - len(tail)
    for piece in parts[1:-1]:
        found = channel.find(piece, pos, end)
        if found < 0:
            return False
        pos = found + len(piece)
    return True


@dataclass(frozen=True, slots=True)
class Grant:
    """What one verified token says: who, until when, and which channels.

    ``subs`` and ``pubs`` are None when the token does not restrict that
    kind of command: the claims restrict, their absence does not.
    """

    user: str
    expires: float  # the token's exp, seconds since the epoch
    subs: tuple[str, ...] | None = None
    pubs: tuple[str, ...] | None = None

    def may_subscribe(self, channel: str) -> bool:
        return self.subs is None or any(match(p, channel) for p in self.subs)

    def may_publish(self, channel: str) -> bool:
        return self.pubs is None or any(match(p, channel) for p in self.pubs)


def _patterns(claims: dict[str, Any], name: str) -> tuple[str, ...] | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise Unauthorized(f"malformed token: {name!r} must be a list of non-empty strings")
    return tuple(value)


class Verifier:
    """Checks tokens against one key; built once per node from its config."""

    def __init__(
        self,
        key: Any,
        algorithms: tuple[str, ...],
        *,
        audience: str = "",
        issuer: str = "",
        leeway: float = 0.0,
    ) -> None:
        self.key = key
        self.algorithms = algorithms
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self._options: dict[str, Any] = {
            "require": ["exp", "sub"],
            # Without a configured audience, a token's `aud` is not checked
            # (PyJWT would otherwise refuse every token that has one).
            "verify_aud": bool(audience),
        }

    def verify(self, token: str) -> Grant:
        """The grant of a valid token; Unauthorized for anything else."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized("malformed token")
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=list(self.algorithms),
                options=self._options,  # type: ignore[arg-type]
                audience=self.audience or None,
                issuer=self.issuer or None,
                leeway=self.leeway,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("invalid token signature") from None
        except jwt.InvalidAlgorithmError:
            raise Unauthorized("token algorithm not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("token issuer not accepted") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("token not valid yet") from None
        except jwt.InvalidTokenError:
            raise Unauthorized("malformed token") from None
        user = claims["sub"]
        if not isinstance(user, str) or not user:
            raise Unauthorized("malformed token: 'sub' must be a non-empty string")
        return Grant(
            user,
            float(claims["exp"]),
            _patterns(claims, SUBSCRIBE_CLAIM),
            _patterns(claims, PUBLISH_CLAIM),
        )

    def authenticate(self, request: WSUpgradeRequest) -> Grant:
        """The grant of the token an upgrade request carries; Unauthorized if none is good."""
        return self.verify(token_of(request))

    def remaining(self, grant: Grant) -> float:
        """Seconds until a connection holding grant must be closed (exp plus leeway)."""
        return grant.expires + self.leeway - time.time()


def token_of(request: WSUpgradeRequest) -> str:
    """The token on an upgrade request: ``?token=`` or ``Authorization: Bearer``.

    Both at once are accepted only when they are the same token; a request
    that names two different ones, or either one twice, is refused rather
    than guessed at.
    """
    tokens: set[str] = set()
    target = request.path
    if b"?" in target:
        query = target.split(b"?", 1)[1].decode("latin-1")
        found = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "token"]
        if len(found) > 1:
            raise Unauthorized("more than one token")
        tokens.update(found)
    headers = request.headers.getall("Authorization", [])
    if len(headers) > 1:
        raise Unauthorized("more than one Authorization header")
    if headers:
        scheme, _, credentials = headers[0].strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise Unauthorized("the Authorization header is not 'Bearer <token>'")
        tokens.add(credentials.strip())
    if not tokens:
        raise Unauthorized("missing token")
    if len(tokens) > 1:
        raise Unauthorized("different tokens in the query and the Authorization header")
    return tokens.pop()


def _load_public_key(path: str) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        with open(path, "rb") as fh:
            pem = fh.read()
    except OSError as exc:
        raise BadKey(f"token_public_key: {exc}") from None
    if b"PRIVATE KEY-----" in pem:
        raise BadKey(
            f"token_public_key: {path} holds a private key; give the node the public key only"
        )
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            return x509.load_pem_x509_certificate(pem).public_key()
        return load_pem_public_key(pem)
    except ValueError as exc:
        raise BadKey(f"token_public_key: {path} is not a PEM public key: {exc}") from None


def _public_key_algorithms(key: Any, path: str) -> tuple[str, ...]:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise BadKey(
                f"token_public_key: {path} is a {key.key_size}-bit RSA key; "
                f"at least {MIN_RSA_BITS} bits are needed"
            )
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        algorithm = EC_ALGORITHMS.get(key.curve.name)
        if algorithm is None:
            known = ", ".join(EC_ALGORITHMS)
            raise BadKey(f"token_public_key: {path}: curve {key.curve.name} is not one of {known}")
        return (algorithm,)
    raise BadKey(f"token_public_key: {path}: an RSA or EC public key is needed")


def verifier(config: Config) -> Verifier | None:
    """The node's verifier, or None when no key is set (an open node).

    BadKey when the key cannot be used: both kinds set, a short secret, an
    unreadable or unsuitable key file.
    """
    secret, path = config.token_secret, config.token_public_key
    if secret and path:
        raise BadKey(
            "token_secret and token_public_key are both set; a node checks tokens "
            "with one key: a shared secret (HS*) or a public key (RS*, PS*, ES*)"
        )
    if secret:
        key: Any = secret.encode()
        if len(key) < MIN_SECRET_BYTES:
            raise BadKey(
                f"token_secret: {len(key)} bytes is too short; use at least "
                f"{MIN_SECRET_BYTES} random bytes (e.g. `openssl rand -base64 48`)"
            )
        algorithms: tuple[str, ...] = HMAC_ALGORITHMS
    elif path:
        key = _load_public_key(path)
        algorithms = _public_key_algorithms(key, path)
    else:
        return None
    return Verifier(
        key,
        algorithms,
        audience=config.token_audience,
        issuer=config.token_issuer,
        leeway=config.token_leeway,
    )
