"""Streaming readers: every format on files the tests write, and every bad-input error."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from index_builder import readers
from index_builder.readers import DuplicateIdChecker, open_ann_hdf5, open_reader
from retrieval.errors import InvalidArgument, NotFound


def write_vecs(path: Path, x: np.ndarray, dtype: str) -> None:
    """TEXMEX layout: int32 dim then the values, per record."""
    with open(path, "wb") as f:
        for row in x:
            f.write(np.int32(len(row)).tobytes())
            f.write(np.asarray(row, dtype=dtype).tobytes())


def collect(reader, block_size=7, start=0):
    blocks = list(reader.blocks(block_size=block_size, start=start))
    assert all(len(b.vectors) <= block_size for b in blocks)
    assert all(b.vectors.dtype == np.float32 and b.vectors.flags.c_contiguous for b in blocks)
    ids = None if blocks[0].ids is None else np.concatenate([b.ids for b in blocks])
    pay = None if blocks[0].payloads is None else [p for b in blocks for p in b.payloads]
    return ids, np.concatenate([b.vectors for b in blocks]), pay


@pytest.fixture
def x():
    return np.random.default_rng(7).standard_normal((53, 6)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- npy
def test_npy_streams_memory_mapped(tmp_path, x):
    p = tmp_path / "a.npy"
    np.save(p, x)
    with open_reader(p) as r:
        assert (r.format, r.count, r.dim, r.has_ids, r.has_payloads) == ("npy", 53, 6, False, False)
        assert isinstance(r._arr, np.memmap)
        ids, v, pay = collect(r)
        assert ids is None and pay is None
        np.testing.assert_array_equal(v, x)
        _, v2, _ = collect(r, block_size=10, start=25)
        np.testing.assert_array_equal(v2, x[25:])


def test_npy_int_dtype_is_cast(tmp_path):
    p = tmp_path / "u8.npy"
    a = np.arange(40, dtype=np.uint8).reshape(10, 4)
    np.save(p, a)
    np.testing.assert_array_equal(readers.read_vectors(p), a.astype(np.float32))


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.zeros(5, np.float32), "2-D"),
        (np.array([["a", "b"]]), "dtype"),
        (np.zeros((3, 2), dtype=[("a", "f4"), ("b", "i4")]), "dtype"),
    ],
)
def test_npy_bad_arrays(tmp_path, arr, match):
    p = tmp_path / "bad.npy"
    np.save(p, arr)
    with pytest.raises(InvalidArgument, match=match):
        open_reader(p)


def test_npy_object_array_is_rejected(tmp_path):
    p = tmp_path / "obj.npy"
    np.save(p, np.array([[1.0, "x"]], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidArgument, match="numeric"):
        open_reader(p)


def test_nan_and_inf_rows_are_named(tmp_path, x):
    y = x.copy()
    y[31, 2] = np.nan
    np.save(tmp_path / "nan.npy", y)
    with pytest.raises(InvalidArgument, match=r"nan\.npy'? row 31: the vector holds NaN"):
        collect(open_reader(tmp_path / "nan.npy"))
    y = x.astype(np.float64)
    y[40, 0] = 1e300  # finite in float64, infinite in float32
    np.save(tmp_path / "big.npy", y)
    with pytest.raises(InvalidArgument, match="row 40: the vector holds a value outside the float32 range"):
        collect(open_reader(tmp_path / "big.npy"))


def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(NotFound, match="does not exist"):
        open_reader(tmp_path / "nope.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(InvalidArgument, match="junk.npy"):
        open_reader(tmp_path / "junk.npy")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(InvalidArgument, match="cannot be read as Parquet"):
        open_reader(tmp_path / "junk.parquet")
    (tmp_path / "junk.hdf5").write_bytes(b"nothing")
    with pytest.raises(InvalidArgument, match="cannot be read as HDF5"):
        open_reader(tmp_path / "junk.hdf5")


# ----------------------------------------------------------------------------------------- *vecs
@pytest.mark.parametrize("fmt, dtype", [("fvecs", "<f4"), ("bvecs", "u1"), ("ivecs", "<i4")])
def test_vecs_roundtrip(tmp_path, fmt, dtype):
    a = np.random.default_rng(1).integers(0, 200, size=(29, 5)).astype(dtype)
    p = tmp_path / f"a.{fmt}"
    write_vecs(p, a, dtype)
    with open_reader(p) as r:
        assert (r.format, r.count, r.dim) == (fmt, 29, 5)
        _, v, _ = collect(r, block_size=4)
        np.testing.assert_array_equal(v, a.astype(np.float32))
        _, v, _ = collect(r, block_size=100, start=28)
        np.testing.assert_array_equal(v, a[28:].astype(np.float32))


def test_fvecs_truncated(tmp_path, x):
    p = tmp_path / "t.fvecs"
    write_vecs(p, x, "<f4")
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    with pytest.raises(InvalidArgument, match=r"truncated.*row 52 is incomplete"):
        open_reader(p)
    p.write_bytes(data[:2])
    with pytest.raises(InvalidArgument, match="truncated"):
        open_reader(p)


def test_fvecs_wrong_dimension_in_the_middle(tmp_path, x):
    p = tmp_path / "w.fvecs"
    write_vecs(p, x[:20], "<f4")
    with open(p, "ab") as f:  # row 20 has dimension 4: the file size is no longer a whole number of records
        f.write(np.int32(4).tobytes() + np.ones(4, "<f4").tobytes())
    write_vecs(tmp_path / "rest.fvecs", x[21:], "<f4")
    with open(p, "ab") as f:
        f.write((tmp_path / "rest.fvecs").read_bytes())
    with pytest.raises(InvalidArgument, match="row 20: the record header says dimension 4, but row 0 has dimension 6"):
        open_reader(p)


def test_fvecs_bad_header_found_while_streaming(tmp_path, x):
    p = tmp_path / "h.fvecs"
    write_vecs(p, x, "<f4")
    raw = bytearray(p.read_bytes())
    rec = 4 + 6 * 4
    raw[37 * rec : 37 * rec + 4] = np.int32(9).tobytes()  # same size, lying header
    p.write_bytes(bytes(raw))
    r = open_reader(p)
    with pytest.raises(InvalidArgument, match="row 37: the record header says dimension 9"):
        collect(r, block_size=16)


# ------------------------------------------------------------------------------------------ hdf5
def write_ann_hdf5(p: Path, train, test, neighbors=None, distance="euclidean"):
    with h5py.File(p, "w") as f:
        f.attrs["distance"] = distance
        f.create_dataset("train", data=train)
        if test is not None:
            f.create_dataset("test", data=test)
        if neighbors is not None:
            f.create_dataset("neighbors", data=neighbors)


def test_hdf5_reader_and_ann_file(tmp_path, x):
    p = tmp_path / "a.hdf5"
    nb = np.tile(np.arange(10), (5, 1))
    write_ann_hdf5(p, x, x[:5] + 1, nb, "angular")
    with open_reader(p) as r:
        assert (r.format, r.count, r.dim, r.metric) == ("hdf5", 53, 6, "cosine")
        np.testing.assert_array_equal(collect(r, block_size=11)[1], x)
    with open_reader(p, dataset="test") as r:
        np.testing.assert_array_equal(r.read_all().vectors, x[:5] + 1)
    f = open_ann_hdf5(p)
    np.testing.assert_array_equal(f.neighbors, nb)
    np.testing.assert_array_equal(f.test, x[:5] + 1)
    assert f.distances is None and f.metric == "cosine"
    f.train.close()


def test_hdf5_missing_datasets(tmp_path, x):
    p = tmp_path / "m.h5"
    write_ann_hdf5(p, x, x[:3])
    with pytest.raises(InvalidArgument, match=r"no dataset 'neighbors'.*found: \['test', 'train'\]"):
        open_reader(p)
    p2 = tmp_path / "other.h5"
    with h5py.File(p2, "w") as f:
        f.create_dataset("vectors", data=x)
    with pytest.raises(InvalidArgument, match=r"no dataset 'train', 'test', 'neighbors'"):
        open_ann_hdf5(p2)
    # only the base is needed when the caller says so
    with readers.Hdf5Reader(p, require=("train",)) as r:
        assert r.count == 53


def test_hdf5_neighbors_out_of_range(tmp_path, x):
    p = tmp_path / "n.hdf5"
    nb = np.zeros((3, 4), np.int64)
    nb[2, 1] = 53
    write_ann_hdf5(p, x, x[:3], nb)
    with pytest.raises(InvalidArgument, match="'neighbors' row 2"):
        open_ann_hdf5(p)


# --------------------------------------------------------------------------------------- parquet
def parquet_table(x, ids=None, fixed=True, extra=True):
    vtype = pa.list_(pa.float32(), x.shape[1]) if fixed else pa.list_(pa.float32())
    cols = {"vector": pa.array(list(x), type=vtype)}
    if ids is not None:
        cols["id"] = pa.array(ids, pa.uint64() if np.asarray(ids).dtype.kind == "u" else pa.int64())
    if extra:
        n = len(x)
        cols["title"] = pa.array([f"doc {i}" for i in range(n)])
        cols["year"] = pa.array([2000 + i for i in range(n)], pa.int32())
        cols["when"] = pa.array([dt.datetime(2024, 1, 1) + dt.timedelta(days=i) for i in range(n)],
                                pa.timestamp("s"))
    return pa.table(cols)


@pytest.mark.parametrize("fixed", [True, False])
def test_parquet_ids_vectors_payloads(tmp_path, x, fixed):
    p = tmp_path / "a.parquet"
    ids = np.arange(1000, 1053, dtype=np.uint64)
    pq.write_table(parquet_table(x, ids, fixed), p, row_group_size=10)
    with open_reader(p) as r:
        assert (r.count, r.dim, r.has_ids, r.has_payloads) == (53, 6, True, True)
        got_ids, v, pay = collect(r, block_size=7)
        np.testing.assert_array_equal(v, x)
        np.testing.assert_array_equal(got_ids, ids)
        assert got_ids.dtype == np.uint64
        assert pay[3] == {"title": "doc 3", "year": 2003, "when": "2024-01-04T00:00:00"}
        ids2, v2, pay2 = collect(r, block_size=8, start=17)  # starts inside a row group
        np.testing.assert_array_equal(v2, x[17:])
        np.testing.assert_array_equal(ids2, ids[17:])
        assert pay2[0]["title"] == "doc 17" and len(pay2) == 36


def test_parquet_column_choice(tmp_path, x):
    p = tmp_path / "c.parquet"
    t = parquet_table(x, np.arange(53), extra=True).rename_columns(["emb_col", "key", "title", "year", "when"])
    pq.write_table(t, p)
    with open_reader(p, id_column="key", payload_columns=["year"]) as r:
        ids, v, pay = collect(r)
        assert r.vector_column == "emb_col" and ids[5] == 5 and pay[5] == {"year": 2005}
    with open_reader(p, id_column=None, payload_columns=[]) as r:
        ids, _, pay = collect(r)
        assert ids is None and pay is None
    with pytest.raises(InvalidArgument, match="no column 'vec'"):
        open_reader(p, vector_column="vec")
    with pytest.raises(InvalidArgument, match="id column 'title' has type string"):
        open_reader(p, id_column="title")


def test_parquet_wrong_dimension_in_the_middle(tmp_path, x):
    rows = [list(r) for r in x]
    rows[44] = rows[44][:5]
    t = pa.table({"vector": pa.array(rows, pa.list_(pa.float32()))})
    pq.write_table(t, tmp_path / "d.parquet", row_group_size=16)
    with pytest.raises(InvalidArgument, match="row 44: the vector has 5 values, but the dimension is 6"):
        collect(open_reader(tmp_path / "d.parquet"), block_size=10)


def test_parquet_null_vector_null_value_nan_negative_id(tmp_path, x):
    rows = [list(map(float, r)) for r in x]
    rows[12] = None
    pq.write_table(pa.table({"vector": pa.array(rows, pa.list_(pa.float64()))}), tmp_path / "n.parquet")
    with pytest.raises(InvalidArgument, match="row 12: the vector is null"):
        collect(open_reader(tmp_path / "n.parquet"))
    rows = [list(map(float, r)) for r in x]
    rows[13] = [1.0, None, 2.0, 3.0, 4.0, 5.0]
    pq.write_table(pa.table({"vector": pa.array(rows, pa.list_(pa.float64()))}), tmp_path / "v.parquet")
    with pytest.raises(InvalidArgument, match="row 13: value 1 of the vector is null"):
        collect(open_reader(tmp_path / "v.parquet"))
    y = x.copy()
    y[50, 5] = np.nan
    pq.write_table(parquet_table(y, extra=False), tmp_path / "nan.parquet")
    with pytest.raises(InvalidArgument, match="row 50: the vector holds NaN"):
        collect(open_reader(tmp_path / "nan.parquet"))
    ids = np.arange(53)
    ids[30] = -4
    pq.write_table(parquet_table(x, ids, extra=False), tmp_path / "neg.parquet")
    with pytest.raises(InvalidArgument, match="row 30: id -4 is negative"):
        collect(open_reader(tmp_path / "neg.parquet"))


def test_parquet_not_a_numeric_vector_column(tmp_path):
    t = pa.table({"vector": pa.array([["a", "b"], ["c", "d"]])})
    pq.write_table(t, tmp_path / "s.parquet")
    with pytest.raises(InvalidArgument, match="expected a list or fixed-size list of ints or floats"):
        open_reader(tmp_path / "s.parquet")


def test_duplicate_ids_across_blocks(tmp_path, x):
    ids = np.arange(53, dtype=np.uint64) * 3
    ids[47] = ids[9]
    pq.write_table(parquet_table(x, ids, extra=False), tmp_path / "dup.parquet", row_group_size=8)
    with pytest.raises(InvalidArgument, match=r"row 47: duplicate id 27 \(already used by row 9\)"):
        collect(open_reader(tmp_path / "dup.parquet"), block_size=5)
    # inside one block
    with pytest.raises(InvalidArgument, match=r"row 47: duplicate id 27 \(already used by row 9\)"):
        collect(open_reader(tmp_path / "dup.parquet"), block_size=100)
    # checking can be switched off (e.g. when the caller checks across shards itself)
    blocks = list(open_reader(tmp_path / "dup.parquet").blocks(block_size=5, check_duplicates=False))
    assert sum(len(b.vectors) for b in blocks) == 53


def test_duplicate_checker_matches_a_set():
    rng = np.random.default_rng(3)
    for trial in range(20):
        n = int(rng.integers(50, 400))
        ids = rng.choice(10 * n, size=n, replace=False).astype(np.uint64)
        dup_at = None
        if trial % 2:
            dup_at = int(rng.integers(1, n))
            ids[dup_at] = ids[int(rng.integers(0, dup_at))]
        c = DuplicateIdChecker("test")
        bs = int(rng.integers(1, 40))
        try:
            for a in range(0, n, bs):
                c.add(ids[a : a + bs], a)
            found = None
        except InvalidArgument as e:
            found = int(str(e).split("row ")[1].split(":")[0])
        assert found == dup_at


# ----------------------------------------------------------------------------------- folders, registry
def test_folder_of_files_and_mixed_dtypes(tmp_path, x):
    d = tmp_path / "parts"
    d.mkdir()
    np.save(d / "part-0.npy", x[:20])
    np.save(d / "part-1.npy", x[20:])
    with open_reader(d) as r:
        assert (r.count, r.dim) == (53, 6)
        np.testing.assert_array_equal(collect(r, block_size=9)[1], x)
        np.testing.assert_array_equal(collect(r, block_size=9, start=18)[1], x[18:])
    np.save(d / "part-2.npy", x[:3].astype(np.float64))
    with pytest.raises(InvalidArgument, match=r"part-2.npy' stores float64 but .*part-0.npy' stores float32; mixed dtypes"):
        open_reader(d)
    (d / "part-2.npy").unlink()
    np.save(d / "part-2.npy", x[:3, :5])
    with pytest.raises(InvalidArgument, match="has dimension 5 but"):
        open_reader(d)


def test_folder_duplicate_ids_across_files_and_row_numbers(tmp_path, x):
    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(parquet_table(x[:30], np.arange(30), extra=False), d / "a.parquet")
    pq.write_table(parquet_table(x[30:], np.arange(29, 52), extra=False), d / "b.parquet")
    with pytest.raises(InvalidArgument, match=r"row 30: duplicate id 29 \(already used by row 29\)"):
        collect(open_reader(d), block_size=7)
    y = x[30:].copy()
    y[4, 0] = np.inf
    pq.write_table(parquet_table(y, np.arange(100, 123), extra=False), d / "b.parquet")
    with pytest.raises(InvalidArgument, match=r"b.parquet. row 4: the vector holds infinity.*its row 0 is row 30 of the folder"):
        collect(open_reader(d), block_size=7)


def test_registry_errors(tmp_path):
    assert set(readers.READERS) == {"npy", "fvecs", "bvecs", "ivecs", "hdf5", "parquet"}
    assert readers.format_for_path("x/y.H5") == "hdf5"
    with pytest.raises(InvalidArgument, match="unknown input format .csv.; valid: bvecs, fvecs, hdf5, ivecs, npy, parquet"):
        readers.reader_class("csv")
    (tmp_path / "a.txt").write_text("1 2 3")
    with pytest.raises(InvalidArgument, match=r"from its extension '.txt'; known extensions: .bvecs"):
        open_reader(tmp_path / "a.txt")
    # the format can be forced for an unusual extension
    np.save(tmp_path / "v.npy", np.ones((2, 3), np.float32))
    (tmp_path / "v.npy").rename(tmp_path / "v.bin")
    assert open_reader(tmp_path / "v.bin", format="npy").count == 2
    with pytest.raises(InvalidArgument, match="block_size must be a positive integer"):
        list(open_reader(tmp_path / "v.bin", format="npy").blocks(block_size=0))
    with pytest.raises(InvalidArgument, match=r"start row must be an integer in \[0, 2\]"):
        list(open_reader(tmp_path / "v.bin", format="npy").blocks(start=3))
