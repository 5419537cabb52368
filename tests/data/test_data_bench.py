"""`korch bench data`: corpus generation as data, and one tiny end-to-end run (slow: starts Ray in subprocesses)."""

import json

import pytest

from korch.data.bench import perturb, write_corpus


def test_perturb_keeps_copy_zero_and_makes_copies_distinct():
    text = "첫 문단.\n둘째 문단.\n셋째 문단."
    assert perturb(text, 0) == text
    copies = {perturb(text, k) for k in range(6)}
    assert len(copies) == 6
    assert all(sorted(c.replace(f" ({k})", "").split("\n")) == sorted(text.split("\n"))
               for k, c in enumerate(perturb(text, k) for k in range(6)))


def test_write_corpus_scales_linearly(corpus_dir, tmp_path):
    paths = write_corpus([str(corpus_dir)], str(tmp_path / "c"), copies=3, max_docs=5)
    lines = [open(p, encoding="utf-8").read().splitlines() for p in paths]
    assert [len(x) for x in lines] == [5, 5, 5]
    assert len({json.loads(line)["text"] for x in lines for line in x}) == 15


@pytest.mark.slow
def test_bench_prints_one_json_line(corpus_dir, capsys):
    from korch.cli import main

    assert main(["bench", "data", "--corpus", str(corpus_dir), "--docs", "6", "--skip-10x", "--actors", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["bench"] == "data" and result["docs"] == 6
    for key in ("single_docs_per_s", "linecache_docs_per_s", "korch_docs_per_s", "kiwi_mt_docs_per_s", "ratio"):
        assert result[key] > 0
    assert set(result["peak_rss_mb"]) == {"single", "linecache", "korch", "kiwi_mt"}
    assert len(result["korch_over_kiwi_mt_by_round"]) == 1 and result["korch_over_kiwi_mt_by_round"][0] > 0


def test_rss_counts_workers_not_cluster_daemons():
    from korch.data.bench import _is_ray_worker

    def check(argv):
        return _is_ray_worker(argv, " ".join(argv))

    assert check(["ray::IDLE"]) and check(["ray::MapWorker(MapBatches(KoreanPreprocessor))"])
    assert check(["python", "/x/ray/_private/workers/default_worker.py", "--node-ip-address=1"])
    assert not check(["/x/ray/core/src/ray/raylet/raylet", "--python_worker_command=python default_worker.py"])
    assert not check(["ray::DashboardAgent"]) and not check(["/x/gcs/gcs_server", "--port=1"])
    assert not check(["/venv/bin/python3", "/venv/ray/dashboard/dashboard.py", "--port=8265"])
    assert check(["/venv/bin/python3", "-m", "korch.data.preencode", "/tmp/korch-wordpiece-x/job.json"])


def test_bench_bad_corpus_is_one_line_before_any_engine(tmp_path, capsys):
    from korch.cli import main

    assert main(["bench", "data", "--corpus", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("korch: error: --corpus: data input") and "does not exist" in err[0]
    assert not (tmp_path / "w").exists()
