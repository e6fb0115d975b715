"""selftrain.analysis.plots: axes that never collapse, one scale per grid with the noise band, text
escaped in the SVG, the same bytes for the same data."""
import pytest

from html_check import Page
from selftrain.analysis import plots
from selftrain.analysis.drift_report import collapse_grid, collapse_panels


def svg_text(svg: str) -> list[str]:
    p = Page(svg)
    assert not p.errors, p.errors[:3]
    return [t for t in p.svg_text if t]


def test_span_never_collapses_and_stays_in_bounds():
    assert plots.span(-0.02, -0.02, 0.1) == pytest.approx((-0.07, 0.03))
    assert plots.span(0.98, 0.99, 0.2, bounds=(0.0, 1.0)) == pytest.approx((0.8, 1.0))
    assert plots.span(-1.0, 3.0, 0.1, bounds=(0.0, 1.0)) == (0.0, 1.0)
    lo, hi = plots.span(float("nan"), 1.0, 0.5)
    assert hi - lo >= 0.5


def test_a_flat_series_gets_a_readable_axis():
    svg = plots.grid([{"title": "flat", "series": {"s": [(0, 0.5, None, None), (1, 0.5, None, None)]}}],
                     ylabel="P", min_span=0.2, bounds=(0.0, 1.0))
    ticks = {t for t in svg_text(svg) if t.replace(".", "").replace("−", "").isdigit()}
    assert len(ticks) >= 3  # y ticks of distinct values (and generations 0, 1)


def test_embedding_axis_is_never_degenerate():
    svg = plots.drift_vs_null([{"x": 1, "value": -0.02, "null95": None}, {"x": 2, "value": -0.02, "null95": None}],
                              threshold=None, ylabel="× null")
    labels = svg_text(svg)
    assert "0.0" in labels and "1.0" in labels  # from 0 to at least 1, not −0.02 to −0.02


def test_one_scale_for_every_panel_of_a_grid():
    panels = [{"title": "a", "centre": 0.5, "band": (0.45, 0.55), "series": {"s": [(0, 0.5, 0.49, 0.51), (1, 0.52, 0.5, 0.54)]}},
              {"title": "b", "centre": 0.2, "series": {"s": [(0, 0.2, None, None), (1, 0.5, 0.4, 0.6)]}}]
    lims = plots.shared_limits(panels, 0.2, (0.0, 1.0))
    heights = [hi - lo for lo, hi in lims]
    assert heights[0] == pytest.approx(heights[1]) and heights[0] >= 0.4
    assert lims[0][0] < 0.45 and lims[0][1] > 0.55  # the band is inside the axis


def test_a_small_collapse_change_is_not_drawn_as_a_cliff():
    names = ["gen-000", "gen-001", "gen-002"]
    values = {"gen-000": {"compression_ratio": 1.82, "distinct_1": 0.9}, "gen-001": {"compression_ratio": 1.80,
              "distinct_1": 0.9}, "gen-002": {"compression_ratio": 1.77, "distinct_1": 0.5}}
    panels = collapse_panels(values, names, [{"candidate": "gen-002", "dimension": "distinct_1", "level": "alert",
                                              "instrument": "collapse"}])
    cr = next(p for p in panels if p["key"] == "compression_ratio")
    assert cr["series"]["change vs gen-000"][-1][1] == pytest.approx(100 * (1.77 - 1.82) / 1.82)
    assert "higher is worse: 1.82 → 1.77" in cr["title"]
    assert next(p for p in panels if p["key"] == "distinct_1")["marks"] == [(2, "alert")]
    for p in panels:
        p["band"] = (-20.0, 20.0)
    lims = plots.shared_limits(panels, 80.0)
    assert all(hi - lo >= 80.0 for lo, hi in lims)  # −2.7 % fills a tenth of the axis at most
    assert abs(cr["series"]["change vs gen-000"][-1][1]) < 0.1 * (lims[0][1] - lims[0][0])
    svg = collapse_grid(panels, 0.2)
    assert "within ±20% of gen-000 (below the watch threshold)" in " ".join(svg_text(svg))


def test_text_is_escaped_and_output_is_deterministic():
    panels = [{"title": "<script>alert(1)</script> $x$", "series": {"arm </svg><b>": [(0, 0.5, 0.4, 0.6)]}}]
    a = plots.grid(panels, ylabel="P", min_span=0.2)
    assert "<script" not in a and "</svg><b>" not in a and "&lt;script&gt;" in a
    assert "<script>alert(1)</script> $x$" in " ".join(svg_text(a))  # mathtext off: dollars stay dollars
    assert a == plots.grid(panels, ylabel="P", min_span=0.2)
    rows = [{"label": f"dimension_{i}", "x": 0.1 * i, "lo": 0.1 * i - 0.05, "hi": 0.1 * i + 0.05, "level": "ok"}
            for i in range(15)]
    f = plots.forest(rows, xlabel="shift", threshold=0.42)
    assert all(f"dimension_{i}" in svg_text(f) for i in range(15))


def test_empty_input_draws_nothing():
    assert plots.grid([], ylabel="P", min_span=0.1) == ""
    assert plots.forest([], xlabel="x") == ""
    assert plots.drift_vs_null([], threshold=1.0, ylabel="x") == ""
    assert plots.stacked_bars([], {}, xlabel="s") == ""


def test_validation_page_draws_its_roc_curves():
    from selftrain.monitor.validate import render_html

    rate = {"hits": 1, "n": 2, "rate": 0.5, "ci95": [0.01, 0.99]}
    result = {"rates": {"shipped/balanced": {"detection_standard_dose": rate, "false_alarm": rate,
                                             "any_alert_benign": rate, "by_trait_and_dose": {"resist@1": rate}}},
              "roc": {"activation": {"auc": 0.75, "curves": {"resist": [(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]}},
                      "embedding": {"auc": None, "curves": {"resist": []}}},
              "settings": {"shipped": {"min_effect": 0.05}, "calibrated": {"min_effect": 0.06}},
              "children": {"<b>child</b>": {"split": "evaluation", "group": "benign", "detected": False,
                                            "value_alerts": []}}}
    page = render_html(result)
    p = Page(page)
    assert not p.errors and "script" not in p.tags and "<b>child" not in page
    assert "activation (AUC 0.75)" in " ".join(p.svg_text) and "false-alarm rate" in " ".join(p.svg_text)
