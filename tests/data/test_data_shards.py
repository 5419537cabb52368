"""Shard columns as data: the numpy-built integer lists are the arrays Arrow builds from the Python lists."""

import subprocess
import sys
import textwrap

import pyarrow as pa

from korch.data.shards import _column


def test_integer_list_columns_equal_arrows_own():
    rows = [[5, 1, 7], [], [2**31 - 1], [0] * 300, []]
    for type_ in (pa.list_(pa.int32()), pa.list_(pa.int64())):
        built = _column(rows, type_)
        assert built.type == type_ and built.equals(pa.array(rows, type=type_))
    assert _column([[], []], pa.list_(pa.int32())).equals(pa.array([[], []], type=pa.list_(pa.int32())))


def test_integer_columns_equal_arrows_own():
    for rows, type_ in (([3, -1, 2**62], pa.int64()), ([], pa.int64()), ([0, 255], pa.uint8()), ([-7], pa.int8())):
        built = _column(rows, type_)
        assert built.type == type_ and built.null_count == 0 and built.equals(pa.array(rows, type=type_))


def test_writing_shards_does_not_import_pandas(tmp_path):
    # pyarrow's pa.array imports pandas on first use (~0.2 s, GIL held), which stalls the corpus pipeline's Kiwi
    # threads; a fresh interpreter shows whether the block writer still pays it.
    script = textwrap.dedent(f"""
        import sys
        from korch.data.shards import ShardWriter
        writer = ShardWriter({str(tmp_path)!r}, "train", group_rows=2)
        for i in range(5):
            writer.write({{"input_ids": [2, 7, 3], "doc_id": i, "doc_starts": [0], "sentence_starts": [0],
                          "word_starts": [0, 1]}})
        assert writer.close()[0]["rows"] == 5
        print("pandas" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_other_columns_are_arrows_own_too():
    # Bools, nulls, floats and nested lists are not flat integer lists: they must come out exactly as pa.array
    # makes them (a None row or a nested row would break the numpy path).
    for rows, type_ in (([[True], [False, True]], pa.list_(pa.bool_())), ([[1, 2], None], pa.list_(pa.int32())),
                        ([1, None], pa.int64()),
                        ([1.5, 2.0], pa.float32()), ([[[1], [2, 3]]], pa.list_(pa.list_(pa.int32())))):
        assert _column(rows, type_).equals(pa.array(rows, type=type_))
