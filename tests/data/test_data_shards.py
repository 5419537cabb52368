"""Shard columns as data: the numpy-built integer lists are the arrays Arrow builds from the Python lists."""

import pyarrow as pa

from korch.data.shards import _column


def test_integer_list_columns_equal_arrows_own():
    rows = [[5, 1, 7], [], [2**31 - 1], [0] * 300, []]
    for type_ in (pa.list_(pa.int32()), pa.list_(pa.int64())):
        built = _column(rows, type_)
        assert built.type == type_ and built.equals(pa.array(rows, type=type_))
    assert _column([[], []], pa.list_(pa.int32())).equals(pa.array([[], []], type=pa.list_(pa.int32())))


def test_other_columns_are_arrows_own_too():
    # Bools, nulls, floats and nested lists are not flat integer lists: they must come out exactly as pa.array
    # makes them (a None row or a nested row would break the numpy path).
    for rows, type_ in (([[True], [False, True]], pa.list_(pa.bool_())), ([[1, 2], None], pa.list_(pa.int32())),
                        ([1.5, 2.0], pa.float32()), ([[[1], [2, 3]]], pa.list_(pa.list_(pa.int32())))):
        assert _column(rows, type_).equals(pa.array(rows, type=type_))
