"""`korch report`: the HTML page and every PNG it links open, and the drawn loss curve is metrics.jsonl's."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

from korch.cli import main
from korch.report import eval_series, train_series, write_report


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []
        self.cells: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.cells.append(data.strip())


def _fake_job(root: Path) -> Path:
    job = root / "demo"
    stage = job / "mlm"
    stage.mkdir(parents=True)
    (job / "job.yaml").write_text("name: demo\nstages:\n- name: mlm\n  task: mlm\n")
    rows = [{"step": s, "epoch": s / 40, "loss": 9.0 - s / 10, "lr": 1e-3 * (1 - s / 40), "samples_per_s": 4.0}
            for s in range(10, 50, 10)]
    rows.insert(2, {"step": 20, "epoch": 0.5, "val_mlm_loss": 8.5, "val_mlm_accuracy": 0.1})
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 41, "lo')  # a torn line
    events = [{"event": e, "step": s, "attempt": 1, "time": 1000.0 + s} for e, s in
              (("start", 0), ("checkpoint", 20), ("failure", 25), ("resume", 20), ("finish", 40))]
    (stage / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (stage / "summary.json").write_text(json.dumps({"final_step": 40, "final_loss": 5.0, "seconds": 12.5}))
    (stage / "eval.json").write_text(json.dumps({"mlm_loss": 8.4, "mlm_accuracy": 0.12}))
    return job


def test_the_page_links_only_images_that_open_and_lists_the_stages(tmp_path):
    import matplotlib.image

    job = _fake_job(tmp_path)
    page = write_report(job, tmp_path / "out")
    parser = _Images()
    parser.feed(page.read_text())
    assert set(parser.sources) == {"timeline.png", "mlm-train.png", "mlm-eval.png"}
    for source in parser.sources:
        image = matplotlib.image.imread(page.parent / source)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image.std() > 0  # a real picture, not blank
    assert "mlm" in parser.cells and "8.4" in parser.cells and "40" in parser.cells


def test_the_loss_curve_is_the_logged_one(tmp_path):
    from korch.train.tracking import _jsonl

    metrics = _jsonl(_fake_job(tmp_path) / "mlm" / "metrics.jsonl")
    assert train_series(metrics)["loss"] == [(10, 8.0), (20, 7.0), (30, 6.0), (40, 5.0)]
    assert eval_series(metrics) == {"mlm_loss": [(0.5, 8.5)], "mlm_accuracy": [(0.5, 0.1)]}


def test_cli_writes_the_report_and_a_bad_path_is_one_line(tmp_path, capsys):
    job = _fake_job(tmp_path)
    assert main(["report", str(job)]) == 0
    assert (job / "report" / "index.html").is_file()
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such runs folder" in capsys.readouterr().err
    assert main(["report", str(job / "mlm")]) == 2  # a stage's folder, not its job's: say which to give
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"korch: error: {job / 'mlm'} is one stage's folder; give its job's folder: korch report {job}"]
