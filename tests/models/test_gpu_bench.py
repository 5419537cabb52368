"""`korch bench gpu`: the FLOP count MFU rests on, as data, and one tiny step on the CPU."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from korch.models.bench import mfu, train_flops_per_token


def _config(**kw):
    base = dict(hidden_size=768, num_hidden_layers=12, intermediate_size=3072, vocab_size=32000, model_type="bert")
    return SimpleNamespace(**{**base, **kw})


def test_bert_base_flops_per_token_by_hand():
    # per layer: linears 2*(4*768^2 + 2*768*3072) = 14,155,776; attention 4*512*768 = 1,572,864
    # head: 2*(768^2 + 768*32000) = 50,331,648; training is 3x the forward
    assert train_flops_per_token(_config(), 512) == 3 * (12 * (14_155_776 + 1_572_864) + 50_331_648)


def test_deberta_adds_both_relative_terms_over_its_bucket_span():
    deberta = _config(model_type="deberta-v2", relative_attention=True, pos_att_type=["p2c", "c2p"],
                      position_buckets=256, max_relative_positions=-1, max_position_embeddings=1536, vocab_size=51200)
    bert = _config(vocab_size=51200)
    # c2p and p2c: 4*256*768 each per layer, 12 layers, x3 for training
    assert train_flops_per_token(deberta, 1536) - train_flops_per_token(bert, 1536) == 3 * 12 * 2 * 4 * 256 * 768
    only_c2p = SimpleNamespace(**{**vars(deberta), "pos_att_type": ["c2p"]})
    assert train_flops_per_token(only_c2p, 1536) - train_flops_per_token(bert, 1536) == 3 * 12 * 4 * 256 * 768
    # Without buckets the span is the relative-position cap, and never more than the sequence.
    unbucketed = SimpleNamespace(**{**vars(deberta), "position_buckets": -1, "max_relative_positions": 4096})
    assert train_flops_per_token(unbucketed, 1024) - train_flops_per_token(bert, 1024) == 3 * 12 * 2 * 4 * 1024 * 768


def test_mfu_is_achieved_over_peak():
    assert mfu(1000.0, 1e12, 1000.0) == pytest.approx(1.0)
    assert mfu(263_445, 717_225_984, 989.4) == pytest.approx(0.191, abs=1e-3)  # the H200 BERT-base row of docs/gpu.md


def test_bench_gpu_runs_a_job_model_on_cpu(tmp_path, capsys):
    from korch.cli import main

    job = tmp_path / "tiny.yaml"
    job.write_text("name: t\nstages:\n  - name: mlm\n    task: coref_mlm\n"
                   "    model: {arch: deberta-v2, size: tiny, gradient_checkpointing: true}\n"
                   "    tokenizer: {vocab_size: 300}\n    data: {seq_len: 32, inputs: [/nowhere/on/this/box]}\n"
                   "    train: {micro_batch_size: 2}\n")
    assert main(["bench", "gpu", "--job", str(job), "--device", "cpu", "--warmup", "0", "--steps", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["bench"] == "gpu" and report["device"] == "cpu"
    # The job's checkpointing first, then flipped; each at the job's micro batch, tokens/s from the median step.
    assert [r["checkpointing"] for r in report["runs"]] == [True, False]
    for run in report["runs"]:
        assert run["arch"] == "deberta-v2" and run["seq_len"] == 32 and run["micro_batch_size"] == 2
        assert run["tokens_per_s"] == pytest.approx(2 * 32 / run["step_s"], rel=1e-2)


def test_bench_gpu_without_a_model_stage_is_one_line(tmp_path, capsys):
    from korch.cli import main

    job = tmp_path / "prep.yaml"
    job.write_text("name: p\nstages:\n  - name: prep\n    task: data_prepare\n")
    assert main(["bench", "gpu", "--job", str(job), "--device", "cpu"]) == 2
    assert "no stage with a `model:` section" in capsys.readouterr().err


def test_bench_gpu_bad_model_field_names_it(tmp_path, capsys):
    from korch.cli import main

    job = tmp_path / "bad.yaml"
    job.write_text("name: b\nstages:\n  - name: mlm\n    task: mlm\n    model: {size: huge}\n")
    assert main(["bench", "gpu", "--job", str(job), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stages.mlm.model.size" in err and str(job) in err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="only a machine without CUDA refuses")
def test_bench_gpu_without_cuda_never_falls_back_to_the_cpu_unasked(capsys):
    # Before: it timed the two base-size jobs at 1536/2048 tokens on the CPU, for the better part of an hour.
    from korch.cli import main

    assert main(["bench", "gpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device here" in err[0] and "--device cpu" in err[0]
