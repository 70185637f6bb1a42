"""plot_history: a PNG of a ResuScheduler run (needs the optional ``plot`` extra: matplotlib)."""
from pathlib import Path
from typing import Union


def plot_history(scheduler, path: Union[str, Path] = "resu_history.png") -> Path:
    """Draw per-cycle sparsity, resurrections (and survivors) and loss to ``path``.

    Example::

        rt.plot_history(scheduler, "history.png")
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot_history needs matplotlib: pip install 'resu-tensor[plot]'") from error
    history = scheduler.history
    if not history:
        raise ValueError("the scheduler has no finished cycle to plot yet")
    cycles = [h.cycle for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(cycles, [h.sparsity for h in history], marker="o")
    axes[0].set(title="sparsity", xlabel="cycle", ylim=(0, 1))
    axes[1].bar(cycles, [h.resurrected for h in history], label="resurrected")
    axes[1].plot(cycles, [h.survivors for h in history], marker="o", color="black", label="survivors")
    axes[1].set(title="resurrections", xlabel="cycle")
    axes[1].legend()
    losses = [(h.cycle, h.loss) for h in history if h.loss is not None]
    if losses:
        axes[2].plot(*zip(*losses), marker="o", color="tab:red")
    axes[2].set(title="mean training loss", xlabel="cycle")
    for ax in axes:
        ax.set_xticks(cycles)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
