"""`korch eval embed`'s numbers as data: pair files, sim/diff means, gap, Spearman, the stage table, the guard."""

from __future__ import annotations

import math

import pytest

from korch.errors import UserError
from korch.eval.embed import format_stage_table, idf_weights, pair_metrics, pool, read_pairs, spearman
from korch.eval.guard import guard_verdict


def test_spearman_matches_rank_correlation_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # scipy.stats.spearmanr([1, 2, 2, 3], [1, 3, 2, 4]) = 0.9486832980505138 (average ranks for the tie)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)


def test_idf_weights_are_smoothed_and_rank_rare_tokens_first():
    rows = [[0, 5, 1], [0, 6, 6, 1], [0, 5, 7, 1]]  # 0 and 1 (CLS, SEP) in every row; repeats count once
    weights = idf_weights(rows, 9)
    assert weights[0] == weights[1] == pytest.approx(1.0)
    assert weights[5] == pytest.approx(math.log(4 / 3) + 1) and weights[6] == pytest.approx(math.log(4 / 2) + 1)
    assert weights[8] == pytest.approx(math.log(4) + 1) == max(weights)  # never seen: the largest weight


def test_idf_pooling_is_the_weighted_mean_over_real_tokens():
    import torch

    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    pooled = pool(hidden, mask, "idf", torch.tensor([[1.0, 3.0, 5.0]]))
    torch.testing.assert_close(pooled, torch.tensor([[0.25, 0.75]]))  # padding's weight never counts
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[0.5, 0.5]]))
    with pytest.raises(ValueError, match="token_weights"):
        pool(hidden, mask, "idf")


def test_pair_metrics_split_by_configurable_thresholds():
    cosines, scores = [0.9, 0.8, 0.5, 0.1, 0.2], [5.0, 4.0, 3.0, 1.0, 0.0]
    m = pair_metrics(cosines, scores)
    assert m["sim_mean"] == pytest.approx(0.85) and m["diff_mean"] == pytest.approx(0.15)
    assert m["gap"] == pytest.approx(0.7) and m["spearman"] == pytest.approx(0.9)
    wide = pair_metrics(cosines, scores, sim_min=3.0, diff_max=0.0)
    assert wide["sim_mean"] == pytest.approx((0.9 + 0.8 + 0.5) / 3) and wide["diff_mean"] == pytest.approx(0.2)


def test_nli_labels_give_gap_without_spearman():
    m = pair_metrics([0.9, 0.1, 0.5], labels=["entailment", "contradiction", "neutral"])
    assert m["gap"] == pytest.approx(0.8) and "spearman" not in m


def test_read_pairs_reads_korsts_with_quotes_and_names_broken_lines(tmp_path):
    good = tmp_path / "sts.tsv"
    good.write_text('genre\tfilename\tyear\tid\tscore\tsentence1\tsentence2\n'
                    'a\tb\tc\t1\t4.5\t그가 "안녕" 했다.\t그는 인사했다.\n'
                    'a\tb\tc\t2\t0.0\t비가 온다.\t고양이가 잔다.')  # no trailing newline, as sts-dev.tsv
    pairs = read_pairs(str(good))
    assert pairs.scores == [4.5, 0.0] and pairs.first[0] == '그가 "안녕" 했다.'
    broken = tmp_path / "broken.tsv"
    broken.write_text("score\tsentence1\tsentence2\n4.0\tonly one field\n")
    with pytest.raises(UserError, match=r"broken.tsv:2: 2 tab-separated fields"):
        read_pairs(str(broken))
    with pytest.raises(UserError, match="header needs sentence1"):
        (tmp_path / "plain.tsv").write_text("text\tlabel\nx\t1\n")
        read_pairs(str(tmp_path / "plain.tsv"))


def test_guard_verdicts():
    assert guard_verdict(0.43, 0.40, 0.0) == "passed"
    assert guard_verdict(0.36, 0.4323, 0.0) == "regressed"  # the seed's stage 2
    assert guard_verdict(0.41, 0.40, 0.02) == "regressed"
    assert guard_verdict(float("nan"), 0.4, 0.0) == "regressed"
    assert guard_verdict(0.3, None, 0.0) == "no_parent"


def test_stage_table_lists_every_scored_stage_with_its_verdict():
    table = format_stage_table({
        "expand": {"sim_mean": 0.9, "diff_mean": 0.5, "gap": 0.4, "spearman": 0.3, "verdict": "unguarded"},
        "simcse": {"sim_mean": 0.8, "diff_mean": 0.3677, "gap": 0.4323, "spearman": 0.6, "verdict": "passed"},
        "adapter": {"sim_mean": 0.8, "diff_mean": 0.44, "gap": 0.36, "spearman": math.nan, "verdict": "regressed"},
        "mlm": {"note": "no embedding evaluation"}})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].split()[3] == "0.4323" and lines[3].endswith("regressed")
    assert format_stage_table({"mlm": {"loss": 1.0}}) is None


def test_eval_embed_bad_paths_are_one_line_and_exit_2(tmp_path, capsys):
    from korch.cli import main

    # The pairs file is read first: a typo in it fails at once, before seconds of loading the model.
    assert main(["eval", "embed", "--model", str(tmp_path), "--pairs", str(tmp_path / "x.tsv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pairs" in err[0] and "cannot read it" in err[0]
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("sentence1\tsentence2\tscore\n가\t나\t4.5\n다\t라\t0.5\n")
    assert main(["eval", "embed", "--model", str(tmp_path), "--pairs", str(pairs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config.json there" in err[0]


@pytest.mark.parametrize("flags, message", [
    (["--limit", "0"], "--limit 0: give at least 1"),  # it used to mean "every pair"
    (["--sim-min", "6"], "sim_min 6: no pair in .* scores that high \\(scores run 0.5-4.5\\); lower it"),
    (["--diff-max", "0.2"], "diff_max 0.2: no pair in .* scores that low"),
    (["--sim-min", "2", "--diff-max", "3"], "diff_max 3 is not below sim_min 2"),
])
def test_eval_embed_thresholds_that_select_no_pair_are_exit_2(tmp_path, capsys, flags, message):
    # Before: sim_mean and gap came out NaN, printed as `NaN`, which is not JSON, and a guard on it never fires.
    import re

    from korch.cli import main

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("sentence1\tsentence2\tscore\n가\t나\t4.5\n다\t라\t0.5\n")
    assert main(["eval", "embed", "--model", str(tmp_path), "--pairs", str(pairs), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
