"""TLS in the node itself (``tls_cert``, ``tls_key``): the server's SSLContext.

Most deployments terminate TLS at the load balancer (docs/tls.md); this is
for a node that faces clients directly. The context allows TLS 1.2 and 1.3
only. For TLS 1.2 it offers only ECDHE key exchange (forward secrecy) with
AEAD ciphers (AES-GCM, ChaCha20-Poly1305); every TLS 1.3 suite is AEAD with
ephemeral keys already. Session tickets are on, so a reconnecting client
resumes its session without a full handshake; the ticket key is the
process's own, made at start, so a ticket is good on the process that
issued it until it restarts.
"""

from __future__ import annotations

import ssl

# TLS 1.2 cipher suites: ECDHE key exchange, AEAD encryption, any certificate
# type (ECDSA or RSA). OpenSSL expands these into the usual six suites.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL"

# TLS 1.3 tickets the server sends after a full handshake (OpenSSL's default,
# stated here because "tickets on" is a promise): one per resumption a client
# may make in parallel.
TLS13_TICKETS = 2


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """An SSLContext serving ``cert`` (PEM, chain included) with ``key`` (PEM).

    Raises ValueError naming what is wrong: a missing or unreadable file, a
    key that is not the certificate's.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION
    context.options &= ~ssl.OP_NO_TICKET
    context.num_tickets = TLS13_TICKETS
    # WebSocket upgrades are HTTP/1.1; a client that offers h2 by ALPN is told.
    context.set_alpn_protocols(["http/1.1"])
    # SSLError is an OSError: it is caught first.
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ValueError(
            f"{cert} and {key}: not a PEM certificate and its private key ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename or cert}: {exc.strerror or exc}") from None
    return context
