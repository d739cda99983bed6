"""permessage-deflate without a socket: negotiation and one-message compression."""

from __future__ import annotations

import zlib

import pytest

from fastws import deflate

REQUIRED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def test_a_plain_offer_is_accepted_without_context_takeover_on_either_side() -> None:
    agreement = deflate.negotiate("permessage-deflate")
    assert agreement is not None
    assert agreement.server_window_bits == 15
    assert agreement.response == REQUIRED


def test_the_browser_offer_is_accepted() -> None:
    agreement = deflate.negotiate("permessage-deflate; client_max_window_bits")
    assert agreement is not None and agreement.response == REQUIRED


@pytest.mark.parametrize("bits", [9, 10, 12, 15])
def test_a_smaller_server_window_is_honoured(bits: int) -> None:
    agreement = deflate.negotiate(f"permessage-deflate; server_max_window_bits={bits}")
    assert agreement is not None
    assert agreement.server_window_bits == bits
    assert agreement.response == f"{REQUIRED}; server_max_window_bits={bits}"


@pytest.mark.parametrize(
    "offer",
    [
        "permessage-deflate; server_max_window_bits=8",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; server_max_window_bits=010",
        "permessage-deflate; server_max_window_bits=ten",
        "permessage-deflate; client_max_window_bits=7",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; mystery",
        "permessage-deflate;",
        "x-webkit-deflate-frame",
        "",
    ],
)
def test_offers_it_cannot_honour_are_declined(offer: str) -> None:
    assert deflate.negotiate(offer) is None


def test_a_later_acceptable_offer_is_taken_when_an_earlier_one_is_declined() -> None:
    agreement = deflate.negotiate(
        "permessage-deflate; server_max_window_bits=8, "
        "permessage-deflate; server_max_window_bits=11"
    )
    assert agreement is not None and agreement.server_window_bits == 11


def test_parameter_names_and_quoted_values_are_read_leniently() -> None:
    agreement = deflate.negotiate('Permessage-Deflate; Server_Max_Window_Bits="12"')
    assert agreement is not None and agreement.server_window_bits == 12


@pytest.mark.parametrize("bits", [9, 15])
def test_a_message_compresses_alone_and_inflates_with_the_tail_put_back(bits: int) -> None:
    message = b'{"ch":"prices","seq":7,"data":"' + b"abc" * 400 + b'"}'
    data = deflate.compress(message, bits, 6)
    assert len(data) < len(message)
    assert not data.endswith(b"\x00\x00\xff\xff")
    assert zlib.decompressobj(-bits).decompress(data + b"\x00\x00\xff\xff") == message
    assert deflate.decompress(data, len(message)) == message


def test_compression_keeps_no_context_between_messages() -> None:
    assert deflate.compress(b"same message" * 20, 15, 6) == deflate.compress(
        b"same message" * 20, 15, 6
    )


def test_inflating_past_the_size_limit_is_refused_without_inflating_it_all() -> None:
    bomb = deflate.compress(b"\x00" * 10_000_000, 15, 9)
    assert len(bomb) < 20_000
    with pytest.raises(deflate.MessageTooBig):
        deflate.decompress(bomb, 65536)


def test_data_that_does_not_inflate_is_refused() -> None:
    with pytest.raises(deflate.DecompressionError):
        deflate.decompress(b"\xff\xff\xff\xff not deflate", 65536)
