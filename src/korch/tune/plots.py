"""Plots of a campaign from its study: optimisation history, parameter importances, parallel coordinates.

HTML comes from `optuna.visualization` (plotly), PNG from `optuna.visualization.matplotlib` (no browser or
kaleido needed). A plot that can't be drawn yet (importances need two finished trials and two varied params)
is skipped with a note, never fatal: the campaign's other outputs matter more.
"""

from __future__ import annotations

import warnings
from pathlib import Path

PLOTS = ("optimization_history", "param_importances", "parallel_coordinate")


def write_plots(study, folder: Path) -> dict[str, str]:
    """Writes plots/<name>.html and .png; returns name -> 'ok' or why it was skipped."""
    import optuna

    folder.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, str] = {}
    finished = [t for t in study.get_trials(deepcopy=False) if t.value is not None]
    for name in PLOTS:
        if len(finished) < 2:
            outcome[name] = "skipped: fewer than 2 trials with a result"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna marks the matplotlib backend experimental
                getattr(optuna.visualization, f"plot_{name}")(study).write_html(str(folder / f"{name}.html"))
                import matplotlib

                matplotlib.use("Agg")
                import matplotlib.pyplot as plt

                axes = getattr(optuna.visualization.matplotlib, f"plot_{name}")(study)
                figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
                figure.savefig(folder / f"{name}.png", dpi=90, bbox_inches="tight")
                plt.close(figure)
            outcome[name] = "ok"
        except (ValueError, RuntimeError, ImportError, ZeroDivisionError) as exc:
            outcome[name] = f"skipped: {exc}"
    return outcome
