"""The fill request's JSON between the language server and a team engine: lossless, and strict on input."""
import pytest

from denoiser.wire import WireError, request_from_json, request_to_json
from fim.request import DraftEvidence, FimRequest, Snippet, SpanPlan


def test_a_request_with_its_draft_and_evidence_round_trips():
    request = FimRequest("# header\n", "x = fo", "\nprint(x)", SpanPlan("line", 32), language="python",
                         path="a.py", snippets=(Snippet("b.py", "foo = 1"),), draft="o(1)",
                         draft_evidence=DraftEvidence(matched_chars=12, matched_lines=2, occurrences=3, next_line=1,
                                                      same_document=1,
                                                      rivals=4))
    assert request_from_json(request_to_json(request)) == request


def test_bad_draft_evidence_is_named():
    data = request_to_json(FimRequest("", "a", "b", SpanPlan("line", 8), draft="c"))
    data["draft_evidence"]["occurrences"] = -1
    with pytest.raises(WireError, match="draft_evidence.occurrences"):
        request_from_json(data)
    data["draft_evidence"] = "many"
    with pytest.raises(WireError, match="draft_evidence must be an object"):
        request_from_json(data)
