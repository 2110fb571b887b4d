"""Fitting how far a model's drafts can be trusted: the regression finds the signal and rates in its order."""
import random

from denoiser.drafts import DraftCalibration
from tools.draft_calibration import fit, precision_above, shown_and_right


def rows(n=300, seed=0):
    """Drafts whose chance of being right grows with the characters their source matched; the rest is noise."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        matched = rng.uniform(0, 4)
        features = {name: rng.gauss(0, 1) for name in DraftCalibration.FEATURES} | {"log_matched_chars": matched}
        out.append({"package": "p", "features": features, "right": rng.random() < matched / 4})
    return out


def test_the_fit_weighs_the_feature_that_carries_the_signal_and_rates_in_its_order():
    calibration = fit(rows())
    weights = calibration.weights
    assert weights["log_matched_chars"] > 1.0
    assert all(abs(w) < 0.5 for name, w in weights.items() if name != "log_matched_chars")
    neutral = {name: 0.0 for name in DraftCalibration.FEATURES}
    assert calibration.probability(neutral | {"log_matched_chars": 0.2}) < 0.3
    assert calibration.probability(neutral | {"log_matched_chars": 3.8}) > 0.7


def test_precision_and_shown_count_at_a_gate():
    rated = [(0.55, False), (0.6, True), (0.65, False), (0.7, True), (0.8, True), (0.9, True)]
    assert precision_above(rated, 0.6) == 0.8 and precision_above(rated, 0.95) == 0.0
    calibration = fit(rows())
    data = rows(seed=1)
    shown, right = shown_and_right(calibration, data, gate=0.5)
    kept = [r for r in data if calibration.probability(r["features"]) >= 0.5]
    assert (shown, right) == (len(kept), sum(r["right"] for r in kept))
    assert 0 < shown < len(data) and right / shown > sum(r["right"] for r in data) / len(data)


def test_collect_drafts_each_cut_from_the_workspace_and_from_the_document_alone(tmp_path, parafill_tiny_model):
    from denoiser.engine import Engine
    from tools.draft_calibration import collect

    package = tmp_path / "pkg"
    package.mkdir()
    # A helper call repeated across files (a workspace draft) and within each file (a document draft).
    for n in range(4):
        body = "".join(f"def handler_{n}_{i}(request):\n    value = load_config(request, strict=True)\n"
                       f"    return render(value)\n\n" for i in range(6))
        (package / f"mod_{n}.py").write_text(body)
    engine = Engine.load(parafill_tiny_model, device="cpu")
    rows = collect(engine.backend, engine, [package], files=2, per_file=6, seed=0, log=lambda _: None)
    settings = {r["setting"] for r in rows}
    assert settings == {"workspace", "document"}
    alone = [r for r in rows if r["setting"] == "document"]
    # With the document alone, every draft can only come from the document itself.
    assert alone and all(r["features"]["same_document"] == 1.0 for r in alone)
    assert all(set(r["features"]) == set(DraftCalibration.FEATURES) for r in rows)
