"""What the demo prints of the report: its tables, without figure links or sections that held only figures."""

from __future__ import annotations

from hybridad.demo import tables_only


def test_tables_only_drops_figures_and_figure_only_sections() -> None:
    report = "\n".join([
        "# report", "", "Runs: a", "",
        "## PRO curves", "", "![PRO curves](pro.png)", "",
        "## Lighting", "", "| c | r |", "|---|---|", "| can | 1.0 |", "![lighting](l.png)", "",
        "## Per category", "", "### can", "", "![can](can.png)", "",
    ])
    assert tables_only(report) == "# report\n\nRuns: a\n\n## Lighting\n\n| c | r |\n|---|---|\n| can | 1.0 |"
