"""tools.quality_plot: eval JSON files become points per kind of run, and a plot is written."""
import json

import pytest

from tools.quality_plot import main, read_point


def write_eval(path, *, drafts: bool, exact: float, shown: float, precision: float, pass1: float | None = None):
    metrics = {"heldout": {"exact_match": exact, "min_confidence": {"0.5": {"shown": shown,
                                                                           "exact_match_of_shown": precision}}}}
    if pass1 is not None:
        metrics["single"] = {"pass@1": pass1}
    path.write_text(json.dumps({"options": {"document_drafts": drafts}, "settings": [{"metrics": metrics}]}))
    return path


def test_points_are_read_by_kind_and_gated_exact_is_shown_times_precision(tmp_path):
    alone = write_eval(tmp_path / "alone.json", drafts=False, exact=0.04, shown=0.1, precision=0.2, pass1=0.02)
    default = write_eval(tmp_path / "dd.json", drafts=True, exact=0.2, shown=0.15, precision=0.6)
    label, tokens, values = read_point(f"stage 5=47.8:{alone},{default}")
    assert (label, tokens) == ("stage 5", 47.8)
    assert values["held-out exact, gate off (model alone)"] == pytest.approx(4.0)
    assert values["held-out exact, gate 0.5 (default settings)"] == pytest.approx(9.0)
    assert values["HumanEval single-line pass@1, gate off (model alone)"] == pytest.approx(2.0)
    assert "HumanEval single-line pass@1, gate off (default settings)" not in values
    out = tmp_path / "plot.png"
    assert main(["--out", str(out), f"a=1:{alone}", f"b=2:{alone},{default}"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="LABEL=MILLIONS_OF_TOKENS"):
        read_point("no tokens here")
