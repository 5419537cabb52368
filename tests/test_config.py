"""The job spec: shipped YAMLs validate, each kind of mistake gives one line naming the field, overrides work."""

from __future__ import annotations

import glob
import textwrap
from pathlib import Path

import pytest

from korch.cli import main
from korch.config import SpecError, load_job

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

GOOD = """\
name: t
stages:
  - name: mlm
    task: mlm
    data: {{inputs: [{data}], seq_len: 64}}
    train: {{max_steps: 10, lr: 2e-5}}
    distributed: {{num_workers: 2, deepspeed: {{zero_stage: 2}}}}
"""


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def _good(tmp_path: Path) -> str:
    return GOOD.format(data=DATA / "kowiki_sample")


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "jobs" / "*.yaml"))))
def test_every_shipped_job_validates(path, monkeypatch):
    monkeypatch.chdir(REPO)  # shipped jobs use paths relative to the repo root
    job = load_job(path)
    assert job.stages


def test_scientific_notation_reads_as_float(tmp_path):
    job = load_job(_write(tmp_path, _good(tmp_path)))
    assert job.stages[0].train.lr == pytest.approx(2e-5)


@pytest.mark.parametrize("change, field, words", [
    (("max_steps: 10", "max_stepz: 10"), "stages.mlm.train.max_stepz", "did you mean 'max_steps'"),
    (("num_workers: 2", "num_workers: two"), "stages.mlm.distributed.num_workers", "valid integer"),
    (("num_workers: 2", "num_workers: '2'"), "stages.mlm.distributed.num_workers", "valid integer"),
    (("task: mlm", "task: mlmm"), "stages.mlm.task", "unknown task 'mlmm'; allowed:"),
    (("num_workers: 2", "num_workers: -2"), "stages.mlm.distributed.num_workers", "greater than or equal to 1"),
    (("zero_stage: 2", "zero_stage: 7"), "stages.mlm.distributed.deepspeed.zero_stage", "less than or equal to 3"),
])
def test_each_mistake_is_one_line_naming_the_field(tmp_path, capsys, change, field, words):
    path = _write(tmp_path, _good(tmp_path).replace(*change))
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"{path}: {field}: ") and words in err[0], err[0]
    assert "Traceback" not in err[0]


def test_missing_data_path_is_named(tmp_path, capsys):
    path = _write(tmp_path, GOOD.format(data=tmp_path / "no_such_corpus"))
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stages.mlm.data.inputs: data input" in err[0] and "no_such_corpus' does not exist" in err[0]


def test_broken_yaml_gives_the_line(tmp_path, capsys):
    path = _write(tmp_path, "name: t\nstages:\n  - name: mlm\n    task: [mlm\n    train: {max_steps: 1}\n")
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 5" in err[0] and "invalid YAML" in err[0], err


def test_missing_job_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_validate_ok_exits_zero(tmp_path, capsys):
    assert main(["validate", _write(tmp_path, _good(tmp_path))]) == 0
    assert "ok" in capsys.readouterr().out


def test_overrides_address_stages_by_name(tmp_path):
    path = _write(tmp_path, _good(tmp_path))
    job = load_job(path, ["stages.mlm.train.lr=1e-4", "stages.mlm.distributed.num_workers=4",
                          "stages.mlm.distributed.deepspeed.zero_stage=3", "stages.mlm.data.seq_len=128"])
    stage = job.stage("mlm")
    assert (stage.train.lr, stage.distributed.num_workers, stage.distributed.deepspeed.zero_stage, stage.data.seq_len) == (1e-4, 4, 3, 128)


@pytest.mark.parametrize("override, words", [
    ("stages.nope.train.lr=1", "no stage named 'nope'"),
    ("stages.mlm.train.bogus=1", "unknown key 'bogus'"),
    ("stages.mlm.train.lr", "expected KEY=VALUE"),
    ("stages.mlm.distributed.num_workers=-1", "greater than or equal to 1"),
])
def test_bad_overrides_are_errors(tmp_path, override, words):
    with pytest.raises(SpecError, match=words):
        load_job(_write(tmp_path, _good(tmp_path)), [override])


def test_relative_paths_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(DATA)
    job = load_job(_write(tmp_path, GOOD.format(data="kowiki_sample")))
    assert [Path(p).resolve() for p in job.stages[0].data.inputs] == [(DATA / "kowiki_sample").resolve()]


@pytest.mark.parametrize("change, words", [
    (("seq_len: 64", "seq_len: 64}\n    model: {max_position_embeddings: 32"), "max_position_embeddings 32 is smaller than data.seq_len 64"),
    (("zero_stage: 2", "zero_stage: 2, precision: bf16"), "needs use_gpu: true"),
    (("zero_stage: 2", "zero_stage: 2, offload_params: true"), "offload_params needs zero_stage: 3"),
    (("    train: {max_steps: 10, lr: 2e-5}\n", ""), None),
])
def test_cross_field_rules(tmp_path, change, words):
    text = _good(tmp_path).replace(*change)
    if words is None:  # the default train section has max_steps, so dropping it is fine
        load_job(_write(tmp_path, text))
        return
    with pytest.raises(SpecError, match=words):
        load_job(_write(tmp_path, text))


def test_needs_must_name_an_earlier_stage(tmp_path):
    text = _good(tmp_path) + "  - {name: ft, task: mlm, needs: later, data: {inputs: [" + str(DATA / "nsmc") + "]}}\n"
    with pytest.raises(SpecError, match="needs 'later', which is not an earlier stage"):
        load_job(_write(tmp_path, text))


CLASSIFY = """\
name: t
stages:
  - name: cls
    task: classify
    data: {{inputs: [{data}], text_column: document}}
    train: {{epochs: 1}}
"""


@pytest.mark.parametrize("task, section, typo, allowed", [
    ("mlm", "mlm", "mlm_probabilty", "mlm_probability"),
    ("classify", "classify", "gama", "gamma"),
])
def test_a_misspelled_task_option_exits_2_naming_the_field(tmp_path, capsys, task, section, typo, allowed):
    text = GOOD.format(data=DATA / "kowiki_sample") if task == "mlm" else CLASSIFY.format(data=DATA / "nsmc" / "ratings_train.head5000.txt")
    stage = "mlm" if task == "mlm" else "cls"
    assert main(["validate", _write(tmp_path, text), "--set", f"stages.{stage}.{section}.{typo}=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"stages.{stage}.{section}.{typo}" in err[0] and f"did you mean '{allowed}'" in err[0]


@pytest.mark.parametrize("override, allowed", [
    ("stages.mlm.eval.embed.pairz=x", "did you mean 'pairs'? allowed: diff_max, limit, pairs, sim_min"),
    ("stages.mlm.distributed.deepspeed.zero_stag=1", "did you mean 'zero_stage'? allowed: offload_optimizer, "
                                                     "offload_params, precision, zero_stage"),
])
def test_a_misspelled_key_in_a_nested_section_lists_that_sections_keys(tmp_path, capsys, override, allowed):
    # Before: the stage's keys were listed for any section below a stage's own (eval.embed, distributed.deepspeed).
    assert main(["validate", _write(tmp_path, GOOD.format(data=DATA / "kowiki_sample")), "--set", override]) == 2
    path, _ = override.split("=")
    line = f"{path}: unknown key '{path.split('.')[-1]}'; {allowed}"
    assert any(err.endswith(line) for err in capsys.readouterr().err.strip().splitlines())


def test_a_section_for_another_task_is_an_error(tmp_path, capsys):
    path = _write(tmp_path, GOOD.format(data=DATA / "kowiki_sample"))
    assert main(["validate", path, "--set", "stages.mlm.classify.pooling=max"]) == 2
    err = capsys.readouterr().err
    assert "section 'classify' holds options of task classify, but this stage runs task mlm" in err


def test_task_options_default_and_validate(tmp_path):
    path = _write(tmp_path, CLASSIFY.format(data=DATA / "nsmc" / "ratings_train.head5000.txt"))
    stage = load_job(path).stages[0]
    assert stage.options.pooling == "cls" and stage.options.loss == "cross_entropy"
    stage = load_job(path, ["stages.cls.classify={pooling: max, loss: focal, gamma: 2.0, alpha: [0.3, 0.7]}"]).stages[0]
    assert (stage.options.pooling, stage.options.gamma, stage.options.alpha) == ("max", 2.0, [0.3, 0.7])
    with pytest.raises(SpecError, match="alpha weights the focal loss"):
        load_job(path, ["stages.cls.classify.alpha=[0.5, 0.5]"])
    with pytest.raises(SpecError, match="pooling: Input should be 'cls', 'mean' or 'max'"):
        load_job(path, ["stages.cls.classify.pooling=avg"])


@pytest.mark.parametrize("override, words", [
    ("stages.cls.eval.select_best=macro_f1", "select_best compares epochs: set eval.every: epoch"),
    ("stages.cls.eval={every: epoch, patience: 2}", "patience counts evaluations without a better select_best"),
    ("stages.cls.data.label_bins=[4, 3]", "strictly ascending"),
    ("stages.cls.data={inputs: [x.tsv]}", "does not exist"),
])
def test_labelled_and_eval_rules(tmp_path, override, words):
    path = _write(tmp_path, CLASSIFY.format(data=DATA / "nsmc" / "ratings_train.head5000.txt"))
    with pytest.raises(SpecError, match=words):
        load_job(path, [override])


def test_a_wildcard_override_sets_every_stage(tmp_path):
    text = _good(tmp_path) + ("  - {name: ft, task: mlm, needs: mlm, train: {max_steps: 5}, data: {inputs: ["
                              + str(DATA / "nsmc") + "]}}\n")
    job = load_job(_write(tmp_path, text), ["stages.*.distributed={num_workers: 3, cpus_per_worker: 0.5}",
                                            "stages.*.train.lr=1e-3", "stages.ft.train.lr=5e-4"])
    assert [s.distributed.num_workers for s in job.stages] == [3, 3]
    assert [s.distributed.cpus_per_worker for s in job.stages] == [0.5, 0.5]
    assert [s.train.lr for s in job.stages] == [1e-3, 5e-4]  # later overrides win


RETRAIN = CLASSIFY + """\
    eval: {{every: epoch, select_best: accuracy}}
  - name: other
    task: classify
    data: {{inputs: [{data}], text_column: document}}
    train: {{epochs: 2}}
  - name: retrain
    task: classify
    retrain_of: [cls, other]
  - name: again
    task: classify
    data: {{inputs: [{data}], text_column: document, train_on_validation: true}}
    train: {{epochs_from: cls}}
"""


def test_retrain_stages_validate_and_name_earlier_stages(tmp_path):
    data = DATA / "nsmc" / "ratings_train.head5000.txt"
    job = load_job(_write(tmp_path, RETRAIN.format(data=data)))
    assert job.stage("retrain").retrain_of == ["cls", "other"]
    assert job.stage("again").train.epochs_from == "cls" and job.stage("again").data.train_on_validation
    with pytest.raises(SpecError, match="retrain_of 'later', which is not an earlier stage"):
        load_job(_write(tmp_path, RETRAIN.format(data=data).replace("[cls, other]", "[cls, later]")))
    with pytest.raises(SpecError, match="needs 'nope', which is not an earlier stage"):
        load_job(_write(tmp_path, RETRAIN.format(data=data).replace("epochs_from: cls", "epochs_from: nope")))
    with pytest.raises(SpecError, match="starts from one model, but needs names 2"):
        load_job(_write(tmp_path, RETRAIN.format(data=data) + "  - {name: x, task: classify, needs: [cls, other], "
                        f"data: {{inputs: [{data}]}}}}\n"))


def test_an_override_changes_one_stage_even_through_a_yaml_alias(tmp_path):
    text = _good(tmp_path).replace("    train: {max_steps: 10, lr: 2e-5}", "    train: &shared {max_steps: 10, lr: 2e-5}")
    text += "  - {name: ft, task: mlm, needs: mlm, train: *shared, data: {inputs: [" + str(DATA / "nsmc") + "]}}\n"
    job = load_job(_write(tmp_path, text), ["stages.ft.train.lr=1e-3"])
    assert [s.train.lr for s in job.stages] == [2e-5, 1e-3]


def test_only_trained_stages_need_an_end(tmp_path):
    text = _good(tmp_path).replace("train: {max_steps: 10, lr: 2e-5}", "train: {lr: 2e-5}")
    with pytest.raises(SpecError, match="stages.mlm: set train.epochs, train.max_steps or train.epochs_from"):
        load_job(_write(tmp_path, text))
    prepare = f"name: t\nstages:\n  - {{name: p, task: data_prepare, train: {{lr: 1e-3}}, data: {{inputs: [{DATA / 'nsmc'}]}}}}\n"
    assert load_job(_write(tmp_path, prepare)).stages[0].train.lr == 1e-3


def test_ngram_arch_validates_for_classify_only(tmp_path):
    path = _write(tmp_path, CLASSIFY.format(data=DATA / "nsmc" / "ratings_train.head5000.txt"))
    stage = load_job(path, ["stages.cls.model={arch: ngram, size: mini, overrides: {ngram_max: 2, buckets: 4096}}"]).stages[0]
    assert (stage.model.arch, stage.model.size, stage.model.overrides) == ("ngram", "mini", {"ngram_max": 2, "buckets": 4096})
    with pytest.raises(SpecError, match="'bert', 'deberta-v2' or 'ngram'"):
        load_job(path, ["stages.cls.model.arch=fasttext"])
    with pytest.raises(SpecError, match="model.arch ngram is a classifier"):
        load_job(_write(tmp_path, _good(tmp_path)), ["stages.mlm.model.arch=ngram"])
