"""alter_jax.study.plotting: the studies' point labels."""

from alter_jax.study.plotting import place_labels


def test_sweep_plot_labels_never_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3), dpi=110)
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0.01, 1)
    ax.set_yscale("log")
    # a crowded corner at the right edge (the study's RMU / SimNPO / GradDiff points) and a lone point
    labels = [(1.00, 0.054, "simnpo_lr3e-05"), (1.01, 0.054, "rmu_lr0.0001"), (1.02, 0.055, "graddiff_lr1e-05"),
              (0.99, 0.056, "npo_gd_lr3e-05"), (0.2, 0.5, "alone")]
    boxes = place_labels(ax, labels)
    assert len(boxes) == 5
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    right = ax.get_window_extent(fig.canvas.get_renderer()).x1
    assert all(b.x1 <= right + 1 for b in boxes)  # labels at the right edge flip to the left of their point
    assert all(b.x0 >= 0 and b.y1 <= fig.bbox.height for b in boxes)  # inside the figure
    lone = ax.transData.transform((0.2, 0.5))
    assert any(abs(b.x0 - lone[0] - 6) < 1 and abs(b.y0 - lone[1]) < 10 for b in boxes)  # next to its point
    plt.close(fig)
