"""The markdown table every benchmark prints its rows as (`python -m bench` and each module's own CLI)."""

from __future__ import annotations


def markdown_table(rows: list[dict]) -> str:
    """Rows (dicts) -> a markdown table; columns in first-seen key order, missing cells empty."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
