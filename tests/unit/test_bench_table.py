"""bench/table.py: the one markdown table helper; bench modules import it, never `bench.__main__`."""

from __future__ import annotations

import ast
from pathlib import Path

from bench.table import markdown_table

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_markdown_table_takes_columns_in_first_seen_order_and_leaves_missing_cells_empty() -> None:
    rows = [{"a": 1, "b": "x"}, {"b": "y", "c": 2.5}]
    assert markdown_table(rows) == "| a | b | c |\n|---|---|---|\n| 1 | x |  |\n|  | y | 2.5 |"


def test_no_bench_module_imports_the_bench_entry_point() -> None:
    """The import direction is one-way: `bench/__main__.py` imports the suites, no suite imports it."""
    importers = []
    for path in sorted(BENCH.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "bench.__main__":
                importers.append(path.name)
    assert importers == []
