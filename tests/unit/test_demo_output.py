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


def test_tables_only_leaves_the_every_key_table_to_the_report_files() -> None:
    report = "\n".join(["# report", "", "Runs: a", "", "## Summary", "", "| c | r |", "|---|---|", "| can | 1.0 |", "",
                        "## All metrics", "", "| key | can |", "|---|---|", "| test_public/seg_f1 | 0.25 |"])
    assert tables_only(report) == "# report\n\nRuns: a\n\n## Summary\n\n| c | r |\n|---|---|\n| can | 1.0 |"
