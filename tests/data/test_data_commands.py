"""The CLI (`korch data prepare`), the `data_prepare` stage runner and the tokenizer helper."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from korch.cli import main
from korch.data.pipeline import check_counts, load_manifest


def test_cli_prepare_trains_a_tokenizer_and_writes_a_manifest(corpus_dir, tmp_path, capsys, ray_session):
    config = tmp_path / "data.yaml"
    config.write_text("data:\n  min_doc_chars: 0\n  validation_fraction: 0.2\n  preprocess_actors: 2\n  actor_cpus: 0.5\n")
    out = tmp_path / "p"
    code = main(["data", "prepare", str(corpus_dir), "--output", str(out), "--seq-len", "64",
                 "--config", str(config), "--vocab-size", "500", "--quiet"])
    assert code == 0
    manifest = load_manifest(str(out))
    assert check_counts(manifest) == [] and manifest["seq_len"] == 64 and manifest["docs_out"] == 9
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert all((out / s["path"]).is_file() for s in manifest["shards"])
    assert "[korch] prepared" in capsys.readouterr().out


def test_cli_missing_input_is_exit_2_naming_the_path(tmp_path, capsys):
    code = main(["data", "prepare", str(tmp_path / "no_such_corpus"), "--output", str(tmp_path / "p")])
    assert code == 2
    err = capsys.readouterr().err
    assert "no_such_corpus" in err and "does not exist" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_prepare_with_no_surviving_document_is_exit_2_saying_why(tmp_path, tokenizer_dir, capsys):
    corpus = tmp_path / "short.txt"
    corpus.write_text("짧다\n")
    code = main(["data", "prepare", str(corpus), "--output", str(tmp_path / "p"), "--seq-len", "64", "--quiet",
                 "--tokenizer", tokenizer_dir])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"korch: error: {corpus}: no document survived (1 read; skipped: too_short 1); "
                                 "check the inputs, min_doc_chars and max_line_chars"]
    assert load_manifest(str(tmp_path / "p"))["docs_out"] == 0  # what was written stays, for a look


def test_cli_prepare_saves_no_tokenizer_learned_from_nothing(tmp_path, capsys):
    # Before: a tokenizer of the 5 special tokens was saved into OUTPUT/tokenizer and reused by the next run, so
    # fixing the config gave shards of [UNK] ids with exit 0.
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"body": "한국어 문장입니다. 두 번째 문장도 조금 더 길게 써 봅니다."}, ensure_ascii=False) + "\n")
    out = tmp_path / "p"
    assert main(["data", "prepare", str(corpus), "--output", str(out), "--seq-len", "64", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"korch: error: {corpus}: no document survived (1 read; skipped: no_text_field 1); check the "
                   "inputs, format, text_fields, min_doc_chars and max_line_chars"]
    assert not out.exists()  # no tokenizer for the fixed run to pick up


def test_no_tokenizer_is_learned_from_no_text(tmp_path, make_cfg):
    from korch.config import StageConfig
    from korch.data.readers import vocabulary_texts
    from korch.data.stage import resolve_tokenizer_dir
    from korch.data.tokenizer import train_wordpiece
    from korch.errors import NoTextError, UserError

    empty, blank = tmp_path / "empty", tmp_path / "blank.txt"
    empty.mkdir()
    blank.write_text("\n\n")
    with pytest.raises(NoTextError, match="no text to learn a WordPiece vocabulary"):
        train_wordpiece(iter(["", "  "]), str(tmp_path / "tok"), 100, 1)
    assert not (tmp_path / "tok").exists()
    with pytest.raises(UserError, match=r"no corpus files found in .*empty \(ignored: none\); put corpus files there"):
        list(vocabulary_texts([str(empty)], make_cfg(inputs=[str(empty)])))
    # --format never widened a folder's listing, so the fix is a glob for what was passed over
    (empty / "wiki.sample").write_text("문장입니다.\n")
    (empty / "README.md").write_text("about\n")
    with pytest.raises(UserError, match=r"name the others, e.g. with the glob '.*empty/\*\.sample'$"):
        list(vocabulary_texts([str(empty)], make_cfg(inputs=[str(empty)])))
    with pytest.raises(UserError, match=r"blank.txt: no document survived \(0 read; skipped: none\)"):
        list(vocabulary_texts([str(blank)], make_cfg(inputs=[str(blank)])))
    # A task's own texts (labelled columns) are named by the stage and its data.inputs.
    stage = StageConfig(name="cls", task="data_prepare", data=make_cfg(inputs=[str(blank)]))
    with pytest.raises(NoTextError, match=r"stage cls: data.inputs \(.*blank.txt\) gave no text"):
        resolve_tokenizer_dir(stage, SimpleNamespace(), tmp_path / "stage_tok", texts=lambda: iter([]))
    assert not (tmp_path / "stage_tok").exists()


@pytest.mark.parametrize("command", [["tokenizer", "train"], ["data", "coref"], ["bench", "data", "--corpus"]])
def test_cli_commands_on_a_corpus_without_text_are_exit_2(tmp_path, tokenizer_dir, capsys, command):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n")
    out = tmp_path / "out"
    extra = [] if command[0] == "bench" else ["--output", str(out)]
    extra += ["--tokenizer", tokenizer_dir] if command[1] == "coref" else []  # coref's own check, past the tokenizer
    assert main([*command, str(blank), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blank.txt" in err[0] and ("no document" in err[0] or "no documents" in err[0]), err
    assert not out.exists()


def test_cli_bad_config_field_is_exit_2(corpus_dir, tmp_path, capsys):
    config = tmp_path / "data.yaml"
    config.write_text("seq_lenn: 64\n")
    assert main(["data", "prepare", str(corpus_dir), "--output", str(tmp_path / "p"), "--config", str(config)]) == 2
    assert "did you mean 'seq_len'" in capsys.readouterr().err


def test_stage_runner_uses_the_given_tokenizer(corpus_dir, tokenizer_dir, tmp_path, make_cfg):
    from korch.config import StageConfig
    from korch.data.stage import run_prepare_stage

    data = make_cfg(inputs=[str(corpus_dir)], seq_len=32, max_docs=4)
    stage = StageConfig(name="prep", task="data_prepare", data=data)
    ctx = SimpleNamespace(stage_dir=tmp_path / "stage", tokenizer_dir=tokenizer_dir)
    summary = run_prepare_stage(stage, ctx)
    assert summary["docs_out"] == 4 and Path(summary["data_dir"]).joinpath("manifest.json").is_file()
    assert summary["tokenizer"] == tokenizer_dir


@pytest.mark.parametrize("pre_tokenize", ["whitespace", "morphemes"])
def test_train_wordpiece_keeps_hangul_and_special_tokens(corpus_dir, tmp_path, pre_tokenize, make_cfg):
    from transformers import AutoTokenizer

    from korch.data.readers import iter_documents
    from korch.data.tokenizer import train_wordpiece

    cfg = make_cfg(inputs=[str(corpus_dir)])
    out = train_wordpiece(iter_documents(cfg.inputs, cfg), str(tmp_path / "tok"), 300, 1, pre_tokenize)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("한국어 문장")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert all(t is not None for t in (tok.pad_token_id, tok.mask_token_id, tok.unk_token_id))
    assert "한" in "".join(tok.convert_ids_to_tokens(ids))  # syllables stay composed (no accent stripping)
    assert json.loads((Path(out) / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"


def test_a_stage_on_data_with_no_rows_says_what_became_of_the_documents(tmp_path, tokenizer_dir, capsys):
    # Before: "each worker gets 0 rows, fewer than one optimizer step needs", with no word of why.
    from korch.config import load_job
    from korch.errors import UserError
    from korch.train.runner import StageContext, run_training_stage

    corpus = tmp_path / "short.txt"
    corpus.write_text("짧다\n")
    prepared = tmp_path / "p"
    assert main(["data", "prepare", str(corpus), "--output", str(prepared), "--seq-len", "64", "--quiet",
                 "--tokenizer", tokenizer_dir]) == 2
    job = tmp_path / "job.yaml"
    job.write_text(f"name: j\nstages:\n  - {{name: mlm, task: mlm, data: {{inputs: [{prepared}], seq_len: 64}}, "
                   f"tokenizer: {{path: {tokenizer_dir}}}}}\n")
    with pytest.raises(UserError, match=r"stage mlm: no training rows in .*p \(1 documents read; skipped: "
                                        r"too_short 1\); check data.inputs"):
        run_training_stage(load_job(str(job)).stage("mlm"), StageContext(stage_dir=tmp_path / "stage"))


def test_an_unreadable_tokenizer_is_one_line_and_korchs_own_cut_short_cache_is_learned_again(tmp_path, tokenizer_dir,
                                                                                             make_cfg, capsys):
    # Before: a truncated tokenizer.json (a crash or a full disk while korch saved it) was reused and failed in
    # `tokenizers` with a traceback, run after run; a bad --tokenizer folder did the same.
    from korch.config import StageConfig
    from korch.data.preprocess import special_ids
    from korch.data.stage import resolve_tokenizer_dir
    from korch.data.tokenizer import tokenizer_problem
    from korch.errors import UserError

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text(Path(tokenizer_dir, "tokenizer.json").read_text()[:100])
    assert "is not a readable tokenizer (EOF while parsing" in tokenizer_problem(str(bad))
    assert tokenizer_problem(tokenizer_dir) is None
    with pytest.raises(UserError, match=r"bad/tokenizer.json is not a readable tokenizer \(EOF.*\); give a fast"):
        special_ids(str(bad))
    corpus = tmp_path / "c.txt"
    corpus.write_text("한국어 문장입니다. 두 번째 문장도 조금 더 길게 써 봅니다.\n\n세 번째 문서는 여기에 있습니다.\n")
    stage = StageConfig(name="s", task="data_prepare", data=make_cfg(inputs=[str(corpus)], min_doc_chars=1),
                        tokenizer={"vocab_size": 100})
    with pytest.raises(UserError, match=r"stage s: tokenizer.path: .*bad/tokenizer.json is not a readable"):
        resolve_tokenizer_dir(stage.model_copy(update={"tokenizer": stage.tokenizer.model_copy(
            update={"path": str(bad)})}), SimpleNamespace(), tmp_path / "unused")
    assert resolve_tokenizer_dir(stage, SimpleNamespace(), bad) == str(bad)  # the stage's own cache: learned again
    assert tokenizer_problem(str(bad)) is None and "training it again" in capsys.readouterr().out
