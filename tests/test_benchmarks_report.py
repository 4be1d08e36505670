"""The benchmark report is generated from the committed results (no number typed by hand)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def test_report_sections_come_from_the_results():
    from benchmarks.report import findings, perf_section, quality_section
    docs = [json.loads((ROOT / "benchmarks" / "results" / f"quality-{a}.json").read_text())
            for a in ("bert", "llama")]
    for doc in docs:
        text = quality_section(doc)
        vanilla = doc["summary"]["vanilla"]["barrier"][0]
        assert f"| vanilla | {vanilla:.4f}" in text
        assert len(doc["per_pair"]) == doc["pairs"] == 6
    assert "removes" in findings(docs)
    perf = json.loads((ROOT / "benchmarks" / "results" / "perf-cpu.json").read_text())
    assert f"{perf['calibration_overhead']['ratio']:.2f}x" in perf_section(perf)
    assert "| vanilla |" in (ROOT / "BENCHMARKS.md").read_text()


def test_beyond_and_multi_sections_and_the_readme_recommendation_come_from_the_results():
    from benchmarks.report import beyond_section, multi_section, recommendation
    results = ROOT / "benchmarks" / "results"
    readme = (ROOT / "README.md").read_text()
    for path in sorted(results.glob("beyond-*.json")):
        doc = json.loads(path.read_text())
        text = beyond_section(doc)
        assert f"Recommendation: `{recommendation(doc)}`" in text
        assert f"`{recommendation(doc)}` |" in readme  # the README table is generated from it
        assert text in (ROOT / "BENCHMARKS.md").read_text()
    for path in sorted(results.glob("multi-*.json")):
        doc = json.loads(path.read_text())
        vanilla = doc["methods"]["vanilla"]["merge_loss"]
        assert f"| vanilla | {vanilla:.4f}" in multi_section(doc)
        assert multi_section(doc) in (ROOT / "BENCHMARKS.md").read_text()
