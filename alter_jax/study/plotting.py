"""Plot helpers shared by the studies' reports (matplotlib, Agg backend; imported lazily by the plots)."""

from __future__ import annotations

from typing import Sequence


def place_labels(ax, labels: Sequence[tuple[float, float, str]], fontsize: float = 7.0) -> list:
    """Annotate each ``(x, y, name)`` point of ``ax`` with its name so that no two labels overlap: measured
    text boxes, placed bottom-up, each moved up past the boxes already placed (and to the left of its point
    where it would leave the axes); a label moved off its point gets a thin leader line. Returns the
    labels' final text extents (display units; leader lines excluded). Call it after ``tight_layout``
    and save at the figure's own dpi: the offsets are in pixels."""
    from matplotlib.text import Text

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    right = ax.get_window_extent(renderer).x1

    def text_box(t):  # the text's own box (an annotation's extent includes its leader line)
        t.update_positions(renderer)
        return Text.get_window_extent(t, renderer)

    placed: list = []
    for x, y, name in sorted(labels, key=lambda lab: ax.transData.transform(lab[:2])[1]):
        dx, dy = 6.0, 4.0
        t = ax.annotate(name, (x, y), xytext=(dx, dy), textcoords="offset pixels", fontsize=fontsize,
                        arrowprops=dict(arrowstyle="-", linewidth=0.4, color="grey"))
        box = text_box(t)
        if box.x1 > right:
            dx = -6.0
            t.set_horizontalalignment("right")
            t.set_position((dx, dy))
            box = text_box(t)
        while any(box.overlaps(b) for b in placed):
            dy += box.height + 1.0
            t.set_position((dx, dy))
            box = text_box(t)
        t.arrow_patch.set_visible(dy > 4.0)  # the leader line only for a label moved off its point
        placed.append(box)
    return placed
