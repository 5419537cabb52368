"""Reading: discovery, format sniffing, chunking on document boundaries, and every bad-input kind counted."""

import collections
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from korch.data.readers import check_output_apart, expand_inputs, iter_documents, plan_chunks, read_chunk, sniff_format
from korch.errors import UserError


def _read_all(path, fmt, target_bytes, bad=None):
    bad = bad if bad is not None else collections.Counter()
    files = expand_inputs([str(path)], fmt)
    return [d for c in plan_chunks(files, target_bytes, bad) for d in read_chunk(c, 100_000, ["text", "content"], bad)]


def test_sniff_format():
    assert sniff_format(b"PAR1\x00") == "parquet"
    assert sniff_format(b'\xef\xbb\xbf<doc id="1">') == "wiki"
    assert sniff_format(b'  {"text": 1}') == "jsonl"
    assert sniff_format("그냥 글".encode()) == "txt"


def test_expand_folder_is_sorted_recursive_and_skips_non_corpus_files(corpus_copy):
    (corpus_copy / "README.md").write_text("# not a corpus")
    (corpus_copy / ".hidden.txt").write_text("숨김")
    (corpus_copy / "sub").mkdir()
    (corpus_copy / "sub" / "more.txt").write_text("더 있다")
    ignored = []
    files = expand_inputs([str(corpus_copy)], "auto", ignored)
    names = [f.path.rsplit("/", 2)[-1] for f in files]
    assert names == ["news.txt", "posts.jsonl", "more.txt", "wiki_00"]
    assert [f.fmt for f in files] == ["txt", "jsonl", "txt", "wiki"]
    assert sorted(p.rsplit("/", 1)[-1] for p in ignored) == [".hidden.txt", "README.md"]


def test_glob_and_file_uri(corpus_dir):
    assert [f.fmt for f in expand_inputs([str(corpus_dir / "*.jsonl")])] == ["jsonl"]
    (src,) = expand_inputs([f"file://{corpus_dir}/news.txt"])
    assert src.path.startswith("file://") and src.fmt == "txt"
    assert _read_all(src.path, "auto", 1 << 20)


def test_missing_input_names_the_path(tmp_path):
    with pytest.raises(UserError, match="nope.txt' does not exist"):
        expand_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(UserError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.jsonl")])


def test_formats_parse_to_documents(corpus_dir):
    assert len(_read_all(corpus_dir / "news.txt", "auto", 1 << 20)) == 4
    posts = _read_all(corpus_dir / "posts.jsonl", "auto", 1 << 20)
    assert len(posts) == 3 and posts[0].startswith("안녕하세요")
    wiki = _read_all(corpus_dir / "wiki_00", "auto", 1 << 20)
    assert len(wiki) == 2 and wiki[0].startswith("김치는") and "</doc>" not in wiki[0]  # title line dropped


@pytest.mark.parametrize("name", ["news.txt", "posts.jsonl", "wiki_00"])
def test_tiny_chunks_give_the_same_documents(corpus_dir, name):
    whole = _read_all(corpus_dir / name, "auto", 1 << 20)
    files = expand_inputs([str(corpus_dir / name)])
    assert len(plan_chunks(files, 64)) >= 2  # really cut (wiki_00 holds 2 documents)
    assert _read_all(corpus_dir / name, "auto", 64) == whole


def test_parquet_row_groups_are_sliced(tmp_path):
    path = tmp_path / "docs.parquet"
    texts = [f"문서 번호 {i} 입니다." for i in range(100)]
    pq.write_table(pa.table({"id": list(range(100)), "text": texts}), path, row_group_size=100)
    files = expand_inputs([str(path)])
    chunks = plan_chunks(files, 1)  # a tiny target forces row slices inside the one row group
    assert len(chunks) > 1 and {c.row_group for c in chunks} == {0}
    assert _read_all(path, "auto", 1) == texts


def test_bad_lines_cost_only_themselves(tmp_path):
    bad = collections.Counter()
    txt = tmp_path / "bad.txt"
    txt.write_bytes("좋은 줄이다.\n".encode() + b"\xff\xfe broken\n" + ("가" * 50 + "\n").encode()
                    + "다음 줄도 좋다.\n\n둘째 문서.\n".encode())
    docs = [d for c in plan_chunks(expand_inputs([str(txt)]), 1 << 20)
            for d in read_chunk(c, 20, ["text"], bad)]
    assert docs == ["좋은 줄이다.\n다음 줄도 좋다.", "둘째 문서."]
    assert bad == {"undecodable_line": 1, "line_too_long": 1}


def test_bad_jsonl_records_are_counted(tmp_path):
    lines = [json.dumps({"text": "첫 문서"}, ensure_ascii=False).encode(),
             b'{"text": "cut off',                       # invalid JSON
             b'{"text": "\xff\xfe"}',                     # undecodable bytes
             json.dumps({"title": "no text"}).encode(),  # no text field
             json.dumps({"text": "x" * 500}).encode(),   # over max_line_chars
             json.dumps({"text": None}).encode(),        # null text -> an empty document later
             b"[1, 2]",                                   # JSON, but not a record
             json.dumps({"text": "마지막 문서"}, ensure_ascii=False).encode()]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    bad = collections.Counter()
    docs = [d for c in plan_chunks(expand_inputs([str(path)]), 1 << 20) for d in read_chunk(c, 100, ["text"], bad)]
    assert docs == ["첫 문서", "", "마지막 문서"]
    assert bad == {"invalid_json": 1, "undecodable_record": 1, "no_text_field": 2, "record_too_long": 1}


def test_corrupt_and_truncated_parquet_are_counted(tmp_path):
    good = tmp_path / "a_good.parquet"
    pq.write_table(pa.table({"text": ["좋은 문서", "또 하나"]}), good)
    truncated = tmp_path / "b_truncated.parquet"
    truncated.write_bytes(good.read_bytes()[:-20])
    garbage = tmp_path / "c_garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet at all PAR1")
    bad = collections.Counter()
    docs = _read_all(tmp_path, "auto", 1 << 20, bad)
    assert docs == ["좋은 문서", "또 하나"]
    assert bad == {"corrupt_parquet": 2}


def test_iter_documents_cleans_dedups_limits_and_counts(corpus_copy, make_cfg):
    (corpus_copy / "dup.jsonl").write_text(
        "\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in ["첫 글 반복", "첫 글 반복", "", "짧"]) + "\n")
    skipped = collections.Counter()
    cfg = make_cfg(inputs=[str(corpus_copy)], min_doc_chars=2)
    docs = list(iter_documents(list(cfg.inputs), cfg, skipped))
    assert docs[:1] == ["첫 글 반복"] and len(docs) == 1 + 4 + 3 + 2
    assert skipped == {"duplicate": 1, "empty": 1, "too_short": 1}
    limited = list(iter_documents(list(cfg.inputs), cfg.model_copy(update={"max_docs": 3})))
    assert limited == docs[:3]


def test_prepared_folder_is_not_a_raw_input(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match="written by `korch data prepare`"):
        expand_inputs([str(tmp_path)])


def test_bom_and_crlf_are_tolerated(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "첫 줄"}, ensure_ascii=False).encode() + b"\r\n"
                     + json.dumps({"text": "둘째 줄"}, ensure_ascii=False).encode() + b"\r\n")
    bad = collections.Counter()
    assert _read_all(path, "auto", 1 << 20, bad) == ["첫 줄", "둘째 줄"] and not bad


def test_crlf_txt_is_cut_on_blank_lines(tmp_path):
    path = tmp_path / "crlf.txt"
    docs = [f"문서 {i} 첫 줄\r\n문서 {i} 둘째 줄" for i in range(20)]
    path.write_bytes("\r\n\r\n".join(docs).encode() + b"\r\n")
    assert len(plan_chunks(expand_inputs([str(path)]), 64)) > 5
    assert _read_all(path, "auto", 64) == [d.replace("\r\n", "\n") for d in docs]


def test_headed_tsv_and_line_per_document_txt_are_sniffed(tmp_path):
    """Labelled sets feed TAPT with their text column; comment dumps (no blank lines) are one doc per line."""
    import collections

    from korch.config import DataConfig
    from korch.data.readers import expand_inputs, iter_documents, plan_chunks, read_chunk

    table = tmp_path / "ratings.txt"
    table.write_text("id\tdocument\tlabel\n" + "".join(f"{i}\t리뷰 \"{i}\" 번째 문장입니다 정말\t{i % 2}\n" for i in range(300)))
    comments = tmp_path / "comments.txt"
    comments.write_text("".join(f"댓글 {i} 번째 내용입니다\n" for i in range(40)))
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("첫 문단입니다.\n둘째 줄.\n\n다음 문단입니다.\n")
    files = expand_inputs([str(table), str(comments), str(paragraphs)])
    assert [f.fmt for f in files] == ["tsv", "lines", "txt"]
    cfg = DataConfig(inputs=[str(table)], min_doc_chars=0, dedup=False)
    docs = list(iter_documents(cfg.inputs, cfg))
    assert len(docs) == 300 and docs[0] == '리뷰 "0" 번째 문장입니다 정말'
    # A chunk from the middle of the file finds its text column through the file's header.
    bad = collections.Counter()
    chunks = plan_chunks(files[:1], 2048, bad)
    assert len(chunks) > 1
    assert [d for c in chunks for d in read_chunk(c, 10_000, cfg.text_fields, bad)] == docs and not bad
    cfg = DataConfig(inputs=[str(comments)], min_doc_chars=0)
    assert len(list(iter_documents(cfg.inputs, cfg))) == 40


# Korean text from Windows tools is often CP949: read as UTF-8 it used to vanish line by line (an empty corpus,
# exit 0), fail with a UnicodeDecodeError traceback (`korch eval embed`), or give no predictions (`korch predict`).
CP949_LINES = [f"{i}번째 리뷰입니다. 배우들의 연기가 좋았다." for i in range(30)]


def _cp949(path, header: str | None = None):
    lines = ([header] if header else []) + CP949_LINES
    path.write_bytes("\n".join(lines).encode("cp949") + b"\n")
    return path


@pytest.mark.parametrize("name", ["reviews.txt", "reviews.jsonl", "wiki_00"])
def test_a_cp949_corpus_file_is_one_line_naming_it_and_the_fix(tmp_path, name):
    path = tmp_path / "corpus" / name
    path.parent.mkdir()
    _cp949(path)
    for given in (path, path.parent, tmp_path / "corpus" / "*"):  # named, in a folder, by a glob
        with pytest.raises(UserError) as caught:
            expand_inputs([str(given)])
        message = str(caught.value)
        assert message.startswith(f"{path}: not UTF-8 text (30 of its first 30 lines do not decode)"), message
        assert "reads as CP949 (EUC-KR)" in message and f"iconv -f cp949 -t utf-8 {path} >" in message


def test_a_binary_file_is_not_called_cp949(tmp_path):
    path = tmp_path / "blob.txt"
    path.write_bytes(b"\xff\xfe\x00\x01\n" * 10)
    with pytest.raises(UserError, match=r"blob.txt: not UTF-8 text \(10 of its first 10 lines do not decode\); "
                                        r"convert it first, e.g. iconv -f ITS-ENCODING -t utf-8"):
        expand_inputs([str(path)])


def test_a_few_undecodable_lines_still_only_cost_themselves(tmp_path):
    path = tmp_path / "mixed.txt"
    good = "\n".join(CP949_LINES[:3]).encode()
    path.write_bytes(good + b"\n" + "한 줄만 CP949".encode("cp949") + b"\n" + good + b"\n")
    assert [f.path for f in expand_inputs([str(path)])] == [str(path)]


def test_labelled_records_and_pairs_check_the_encoding_too(tmp_path):
    from korch.data.records import read_records
    from korch.eval.embed import read_pairs

    table = _cp949(tmp_path / "train.tsv", "id\tdocument\tlabel")
    with pytest.raises(UserError, match=r"train.tsv: not UTF-8 text .* reads as CP949"):
        read_records(str(table))
    pairs = tmp_path / "sts.tsv"
    pairs.write_bytes(("sentence1\tsentence2\tscore\n" + "\n".join(f"{s}\t{s}\t4.0" for s in CP949_LINES))
                      .encode("cp949"))
    with pytest.raises(UserError, match=r"sts.tsv: not UTF-8 text .* reads as CP949"):
        read_pairs(str(pairs))


@pytest.mark.parametrize("output, where", [("corpus", "is"), ("corpus/prepared", "is inside"), (".", "holds")])
def test_an_output_overlapping_an_input_is_refused(tmp_path, monkeypatch, output, where):
    # An output folder inside a corpus folder is read back as corpus by the next run; one that holds the corpus
    # can have its train/ and validation/ replaced.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    with pytest.raises(UserError, match=rf"^--output {output} {where} the input corpus; keep outputs apart"):
        check_output_apart(["corpus", "s3://bucket/x", "other/*.txt"], output)
    check_output_apart(["corpus"], "corpus-prepared")  # a sibling whose name starts alike is apart
