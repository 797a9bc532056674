"""The stored forms of a trace: a trace stored in the parts form (version 3) stays readable."""

from __future__ import annotations

from pathlib import Path

import pytest

from audit.codec import compress_trace, decompress_trace, load_trace
from audit.shipping import encode_value
from audit.trace_store import MARK, parts_of, read_trace

GOLDEN = Path(__file__).parent / "data" / "stored_trace_v3.msgpack"


def test_a_trace_stored_in_the_parts_form_reads_back_as_it_was_decided() -> None:
    """A parts-form trace as the writer stored it (policy bundle, 32 candidates): whatever changes
    in packing, this must keep reading the same (a new layout needs a new version and this reader)."""
    stored = GOLDEN.read_bytes()
    trace = read_trace(stored)
    assert trace["stored_version"] == 2 and trace["policy_revision"]
    request = trace["request"]
    assert request["request_id"] == "r2" and request["allowed_jurisdictions"] == ["EU"]
    assert request["session_id"].startswith("h:")  # masked when it was stored
    locate, guard, score, choose = (trace["stages"][s] for s in ("locate", "guard", "score", "choose"))
    assert len(locate["candidates"]) == 32 and locate["candidates"][0] == "ep0"
    assert guard["removed"]["ep0"] == ["residency.sites"]
    assert guard["removed"]["ep32"] == ["safety.gpu_temperature", "safety.xid_errors"]
    assert choose == {"chosen": "ep8", "propensity": 1.0, "fallbacks": ["ep104"], "shadow": []}
    chosen = next(r for r in score["candidates"] if r["endpoint_id"] == "ep8")
    assert chosen["expected_ttft_ms"] == pytest.approx(921.3936265494268)
    assert chosen["components"]["rtt_ms"] == 3.0 and chosen["features"]["bias"] == 1.0
    assert trace["telemetry"]["ep0"]["ages_s"]["queue_running"] == pytest.approx(29.899)
    # Every compression of it decompresses to the same bytes, and load_trace reads each.
    for codec in ("json", "lz4", "zlib"):
        z = compress_trace(stored, codec=codec)
        assert decompress_trace(z) == stored and load_trace(z) == trace


def test_a_stored_trace_of_an_unknown_version_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unsupported stored trace version 4"):
        parts_of(encode_value([MARK, 4, []]))
    with pytest.raises(ValueError, match="not a stored trace"):
        parts_of(encode_value(["something else", 3, []]))
