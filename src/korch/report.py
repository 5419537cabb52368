"""`korch report RUNS/<job> [--output DIR]`: a static HTML page with PNG plots of a job's run.

Per stage: loss and learning rate against step, evaluation metrics per epoch; for the job: a timeline of every
stage's events (start, checkpoint, failure, resume, skip, finish) and a table of stages with their final
metrics. A tuning campaign's own plots (`RUNS/<job>/tune/*.png`) are linked in. Everything is read from the files
korch writes, so a report can be made while a job runs, or long after, on any machine.
"""

from __future__ import annotations

import html
import shutil
from pathlib import Path
from typing import Any

from korch.errors import UserError
from korch.train.tracking import _json, _jsonl

EVENT_MARKS = {"start": ("o", "tab:green"), "finish": ("s", "tab:blue"), "checkpoint": ("|", "tab:gray"),
               "failure": ("x", "tab:red"), "resume": ("^", "tab:orange"), "skip": ("D", "tab:purple")}


def stage_dirs(job_dir: Path) -> list[Path]:
    """The job's stages in job order (from its job.yaml), else every folder with a stage's files."""
    names: list[str] = []
    try:
        import yaml

        names = [s["name"] for s in yaml.safe_load((job_dir / "job.yaml").read_text())["stages"]]
    except (OSError, ValueError, KeyError, TypeError):
        names = sorted(p.name for p in job_dir.iterdir() if p.is_dir())
    return [job_dir / n for n in names if (job_dir / n / "events.jsonl").is_file() or (job_dir / n / "metrics.jsonl").is_file()]


def train_series(metrics: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """(step, value) of loss and lr from the training rows of metrics.jsonl: the curves the report draws."""
    return {key: [(row["step"], row[key]) for row in metrics if key in row and "step" in row] for key in ("loss", "lr")}


def eval_series(metrics: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """(epoch, value) per `val_*` metric of the evaluation rows."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in metrics:
        for key, value in row.items():
            if key.startswith("val_") and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key[4:], []).append((row.get("epoch", row.get("step", 0)), value))
    return series


def _figure(plots: list[tuple[str, dict[str, list[tuple[float, float]]], str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(plots), figsize=(5 * len(plots), 3.4), squeeze=False)
    for ax, (title, series, xlabel) in zip(axes[0], plots):
        for name, points in series.items():
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None,
                        label=name)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        if len(series) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _timeline(stages: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [e["time"] for events in stages.values() for e in events if isinstance(e.get("time"), (int, float))]
    origin = min(times) if times else 0.0
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(stages) + 1.2))
    for row, (name, events) in enumerate(stages.items()):
        for kind, (marker, color) in EVENT_MARKS.items():
            xs = [(e["time"] - origin) / 60 for e in events if e.get("event") == kind and isinstance(e.get("time"), (int, float))]
            if xs:
                ax.scatter(xs, [row] * len(xs), marker=marker, color=color, label=kind, s=40)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    ax.set_yticks(range(len(stages)), list(stages))
    ax.set_xlabel("minutes since the first event")
    ax.set_title("events")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _final_metrics(stage_dir: Path) -> dict[str, Any]:
    summary, evaluation = _json(stage_dir / "summary.json"), _json(stage_dir / "eval.json")
    row: dict[str, Any] = {"state": "done" if summary else "unfinished", "step": summary.get("final_step"),
                           "loss": summary.get("final_loss"), "seconds": summary.get("seconds")}
    row.update({k: v for k, v in evaluation.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return row


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else html.escape(str(value))


def write_report(job_dir: Path, output: Path | None = None) -> Path:
    """Write `index.html` and its PNGs into `output` (default RUNS/<job>/report/); returns the page's path."""
    job_dir = Path(job_dir)
    if not job_dir.is_dir():
        raise UserError(f"{job_dir}: no such runs folder; give RUNS/<job>, e.g. runs/quickstart")
    stages = stage_dirs(job_dir)
    if not stages:
        from korch.train.plan import stage_folder_hint

        if hint := stage_folder_hint(job_dir, "report"):
            raise UserError(hint)
        raise UserError(f"{job_dir}: holds no stage with metrics.jsonl or events.jsonl; run the job first")
    output = Path(output) if output else job_dir / "report"
    output.mkdir(parents=True, exist_ok=True)
    sections, rows, events = [], [], {}
    for stage_dir in stages:
        name = stage_dir.name
        metrics = _jsonl(stage_dir / "metrics.jsonl")
        events[name] = _jsonl(stage_dir / "events.jsonl")
        rows.append((name, _final_metrics(stage_dir)))
        images = []
        train = train_series(metrics)
        if train["loss"]:
            _figure([("loss", {"loss": train["loss"]}, "step"), ("learning rate", {"lr": train["lr"]}, "step")],
                    output / f"{name}-train.png")
            images.append(f"{name}-train.png")
        evaluation = eval_series(metrics)
        if evaluation:
            _figure([("evaluation", evaluation, "epoch")], output / f"{name}-eval.png")
            images.append(f"{name}-eval.png")
        body = "".join(f'<img src="{html.escape(i)}" alt="{html.escape(i)}">' for i in images) or "<p>no metrics logged</p>"
        sections.append(f"<h2>{html.escape(name)}</h2>{body}")
    _timeline(events, output / "timeline.png")
    tune = job_dir / "tune"
    campaign = sorted(tune.glob("*.png")) if tune.is_dir() else []
    for png in campaign:
        shutil.copyfile(png, output / f"tune-{png.name}")
    if campaign:
        sections.append("<h2>tuning campaign</h2>" + "".join(
            f'<img src="tune-{html.escape(p.name)}" alt="{html.escape(p.stem)}">' for p in campaign))
    columns = ["state", "step", "loss", "seconds"] + sorted({k for _, r in rows for k in r} - {"state", "step", "loss", "seconds"})
    table = "<table><tr><th>stage</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>" + "".join(
        f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in columns) + "</tr>" for n, r in rows
    ) + "</table>"
    page = output / "index.html"
    page.write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>korch report: {html.escape(job_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} img{{max-width:100%;margin:.5em 0;display:block}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:right}}</style></head>
<body><h1>korch report: {html.escape(job_dir.name)}</h1>
<h2>stages</h2>{table}
<h2>timeline</h2><img src="timeline.png" alt="timeline">
{"".join(sections)}
</body></html>
""", encoding="utf-8")
    return page


def register(sub) -> None:
    p = sub.add_parser("report", help="write a static HTML page with PNG plots of a job's run")
    p.add_argument("job_dir", metavar="RUNS/<job>")
    p.add_argument("--output", default=None, metavar="DIR", help="where index.html and the PNGs go (default RUNS/<job>/report)")
    p.set_defaults(func=lambda args: print(f"[korch] report written to {write_report(Path(args.job_dir), args.output and Path(args.output))}") or 0)
