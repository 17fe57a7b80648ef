"""Reading a chart's clicks: st.altair_chart's on_select state, {"selection": {name: points}}."""

from __future__ import annotations


def clicked_points(event, selection: str) -> list[dict]:
    """The points (field: value dicts) of the named selection; none before any click."""
    return (event or {}).get("selection", {}).get(selection) or []


def clicked_cell(event, selection: str, fields: tuple[str, str]) -> tuple[int, int] | None:
    """The two integer fields of the first clicked point, e.g. (layer, head)."""
    points = clicked_points(event, selection)
    if points and all(field in points[0] for field in fields):
        return int(points[0][fields[0]]), int(points[0][fields[1]])
    return None
