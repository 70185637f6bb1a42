"""plot_history: a figure of a ResuScheduler run, step by step (needs the optional ``plot`` extra:
matplotlib)."""
from pathlib import Path
from typing import Optional, Union

PHASE_CHANGE_STYLE = {"prune": dict(color="tab:gray", linestyle="--"),
                      "commit": dict(color="tab:green", linestyle="-")}


def plot_history(scheduler, path: Optional[Union[str, Path]] = None):
    """Draw the scheduler's per-step history (``scheduler.steps``): training loss, sparsity, the
    resurrected share of the active set and, when ``step(loss, metrics=...)`` got any, the
    metrics, one panel each over the step axis. Dashed lines mark prunes, solid ones commits, and
    the RESU phases are shaded. Returns the matplotlib ``Figure``; with ``path`` it is also saved
    there (PNG, PDF, SVG ... by the suffix). Works headless: no pyplot state, no GUI backend.

    Example::

        fig = rt.plot_history(scheduler, "history.png")
        fig.axes[0].get_title()     # "training loss"
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plot_history needs matplotlib: pip install 'resu-tensor[plot]'") from error
    records = getattr(scheduler, "steps", None)
    if records is None:
        raise TypeError(f"plot_history needs a ResuScheduler, got {type(scheduler).__name__}")
    if not records:
        raise ValueError("the scheduler has no recorded step to plot yet: call scheduler.step(loss) first")
    metric_names = sorted({name for r in records for name in r.metrics})
    panels = [("training loss", {"loss": [(r.step, r.loss) for r in records if r.loss is not None]}),
              ("sparsity", {"sparsity": [(r.step, r.sparsity) for r in records if r.sparsity is not None]}),
              ("resurrected share of the active set",
               {"resurrected share": [(r.step, r.resurrected_share) for r in records if r.resurrected_share is not None]})]
    if metric_names:
        panels.append(("metrics", {name: [(r.step, r.metrics[name]) for r in records if name in r.metrics]
                                   for name in metric_names}))
    fig = Figure(figsize=(10, 2.2 * len(panels)), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    resu_spans = _resu_spans(records)
    for ax, (title, series) in zip(axes, panels):
        for label, points in series.items():
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if len(points) < 30 else None)
        for r in records:
            for event, style in PHASE_CHANGE_STYLE.items():
                if r.event and event in r.event.split("+"):
                    ax.axvline(r.step, linewidth=0.8, **style)
        for start, end in resu_spans:
            ax.axvspan(start, end, color="tab:orange", alpha=0.12, linewidth=0)
        ax.set_title(title)
        if len(series) > 1:
            ax.legend(loc="best")
    axes[-1].set_xlabel("step")
    if path is not None:
        fig.savefig(Path(path), dpi=110)
    return fig


def _resu_spans(records) -> list[tuple[int, int]]:
    """(first step, last step) of every RESU phase in the records."""
    spans, start = [], None
    for r, after in zip(records, records[1:] + [None]):
        if r.phase == "resu" and start is None:
            start = r.step
        if start is not None and (after is None or after.phase != "resu"):
            spans.append((start, r.step))
            start = None
    return spans


__all__ = ["plot_history"]
