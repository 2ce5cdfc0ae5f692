"""RFC 4475 torture messages: each one parses or is rejected with the stack's typed error.

The project's own verdict table below mirrors ../shared/corpus/rfc4475/VERDICTS.tsv; the test
reads the byte-exact files from that folder (skipped outside CI when it is absent).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clearip.relay.sip.errors import SipParseError
from clearip.relay.sip.message import Request
from clearip.relay.sip.parser import content_length_conflict, parse_message

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "rfc4475"

VERDICTS = {
    "TC_WSINV.dat": "parse",
    "TC_INTMETH.dat": "parse",
    "TC_ESC01_V.dat": "parse",
    "TC_ESCNULL_V.dat": "parse",
    "TC_ESC02_V.dat": "parse",
    "TC_LWSDISP_V.dat": "parse",
    "TC_LONGREQ_V.dat": "parse",
    "TC_DBLREQ.dat": "parse",
    "TC_SEMIURI_V.dat": "parse",
    "TC_TRANSPORTS_V.dat": "parse",
    "TC_MPART01.dat": "parse",
    "TC_UNREASON_V.dat": "parse",
    "TC_NOREASON_V.dat": "parse",
    "TC_BADINV01_I.dat": "reject",
    "TC_CLERR_I.dat": "reject",
    "TC_NCL_I.dat": "reject",
    "TC_SCALAR02_V.dat": "reject",
    "TC_SCALARLG_V.dat": "reject",
    "TC_QUOTBAL_I.dat": "reject",
    "TC_LTGTRURI_I.dat": "reject",
    "TC_LWSRURI_I.dat": "reject",
    "TC_LWSSTART_V.dat": "reject",
    "TC_TRWS_I.dat": "reject",
    "TC_ESCRURI_V.dat": "reject",
    "TC_BADDATE_V.dat": "reject",
    "TC_REGBADCT_I.dat": "reject",
    "TC_BADASPEC_I.dat": "reject",
    "TC_BADDN_I.dat": "reject",
    "TC_BADVERS_V.dat": "reject",
    "TC_MISMATCH01_V.dat": "reject",
    "TC_MISMATCH02_V.dat": "reject",
    "TC_BIGCODE_V.dat": "reject",
    "TC_BADBRANCH_V.dat": "parse",
    "TC_INSUF_I.dat": "parse",
    "TC_UNKSCM_V.dat": "parse",
    "TC_NOVELSC_V.dat": "parse",
    "TC_UNKSM2_V.dat": "parse",
    "TC_BEXT01_V.dat": "parse",
    "TC_INVUT_V.dat": "parse",
    "TC_REGAUT01_V.dat": "parse",
    "TC_MULTI01_I.dat": "parse",
    "TC_MCL01_I.dat": "parse",
    "TC_BCAST_V.dat": "parse",
    "TC_ZEROMF_V.dat": "parse",
    "TC_CPARAM01_V.dat": "parse",
    "TC_CPARAM02_V.dat": "parse",
    "TC_REGESCRT_V.dat": "parse",
    "TC_SDP01_V.dat": "parse",
    "TC_INV2543_I.dat": "parse",
    "TC_TEST_I.dat": "reject",
}


def _corpus() -> Path:
    if not CORPUS.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the RFC 4475 corpus is missing at {CORPUS}")
        pytest.skip(f"RFC 4475 corpus not found at {CORPUS} (it lives in ../shared)")
    return CORPUS


def test_table_matches_shared_verdicts() -> None:
    lines = (_corpus() / "VERDICTS.tsv").read_text().splitlines()[1:]
    shared = {line.split("\t")[0]: line.split("\t")[3] for line in lines if line.strip()}
    assert shared == VERDICTS


@pytest.mark.parametrize(("name", "verdict"), sorted(VERDICTS.items()))
def test_verdict(name: str, verdict: str) -> None:
    data = (_corpus() / name).read_bytes()
    if verdict == "parse":
        message = parse_message(data)
        # What the proxy does not edit comes out byte-exact.
        head = data.split(b"\r\n\r\n", 1)[0]
        assert message.to_bytes().startswith(head)
    else:
        with pytest.raises(SipParseError) as info:
            parse_message(data)
        assert info.type is not SipParseError or info.value.kind
        assert info.value.reason


def test_extra_octets_after_content_length_are_ignored() -> None:
    message = parse_message((_corpus() / "TC_DBLREQ.dat").read_bytes())
    assert isinstance(message, Request)
    assert message.method == "REGISTER"
    assert message.body == b""


def test_multiple_content_lengths_are_flagged_for_a_400() -> None:
    message = parse_message((_corpus() / "TC_MCL01_I.dat").read_bytes())
    assert content_length_conflict(message)


def test_tortuous_invite_headers_are_readable() -> None:
    message = parse_message((_corpus() / "TC_WSINV.dat").read_bytes())
    assert isinstance(message, Request)
    assert message.to_tag == "1918181833n"
    assert message.from_tag == "98asjd8"
    assert message.cseq == (9, "INVITE")
    assert [v.branch for v in message.vias()] == ["390skdjuw", "z9hG4bK9ikj8", "z9hG4bK30239"]
    contact = message.addresses("contact")[0]
    assert contact.uri_text == "sip:jdrosen@example.com"
    assert contact.q == pytest.approx(0.33)
