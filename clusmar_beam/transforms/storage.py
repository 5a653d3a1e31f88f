"""Reading pools and writing outputs as columnar batches (core.batch.Batch), all through Beam's FileSystems.

Inputs are Parquet (through Beam's ReadAllFromParquetBatched) or TFRecord
`tf.train.Example` files (parsed a batch at a time with `tf.io.parse_example`).
Outputs are written to a temporary directory and renamed into place by a last
step, so a failed run never leaves files that look complete.
"""
from __future__ import annotations

import dataclasses
import json
import math
import posixpath
import uuid

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from clusmar_beam.core import progress
from clusmar_beam.core.batch import Batch
from clusmar_beam.core.errors import InputError, rows_text


SUCCESS = "_SUCCESS"
TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfr")


# ---------------------------------------------------------------- file lookup

def match_files(pattern: str, flag: str) -> list[str]:
    """Files matching a glob, sorted; markers such as _SUCCESS and hidden files excluded."""
    try:
        results = FileSystems.match([pattern])[0].metadata_list
    except Exception as exc:  # Beam raises BeamIOError for unreadable locations.
        raise InputError(f"{flag} {pattern!r}: cannot list files ({exc})") from exc
    files = sorted(m.path for m in results
                   if not posixpath.basename(m.path).startswith(("_", ".")))
    if not files:
        raise InputError(f"{flag} {pattern!r}: no files match")
    return files


def detect_format(files: list[str], flag: str) -> str:
    """'parquet' or 'tfrecord', from the extension or else the Parquet magic bytes."""
    formats = set()
    for path in files:
        if path.endswith(".parquet"):
            formats.add("parquet")
        elif path.endswith(TFRECORD_SUFFIXES):
            formats.add("tfrecord")
        else:
            with FileSystems.open(path, compression_type="uncompressed") as handle:
                formats.add("parquet" if handle.read(4) == b"PAR1" else "tfrecord")
    if len(formats) > 1:
        raise InputError(f"{flag}: files mix Parquet and TFRecord ({len(files)} files)")
    return formats.pop()


# ---------------------------------------------------------------- schemas

@dataclasses.dataclass(frozen=True)
class Column:
    """What a reader needs to know of one input column."""
    name: str
    kind: str        # "int64", "float", "bytes"
    is_list: bool


def _arrow_kind(arrow_type) -> tuple[str, bool]:
    is_list = (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)
               or pa.types.is_fixed_size_list(arrow_type))
    base = arrow_type.value_type if is_list else arrow_type
    if pa.types.is_integer(base):
        return "int64", is_list
    if pa.types.is_floating(base):
        return "float", is_list
    if pa.types.is_string(base) or pa.types.is_large_string(base):
        return "string", is_list
    if pa.types.is_binary(base) or pa.types.is_large_binary(base):
        return "bytes", is_list
    return str(base), is_list


def _parquet_footer(path: str):
    """The file's Parquet metadata; a file that is not Parquet (truncated, another format) is bad input."""
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        try:
            return pq.ParquetFile(handle).metadata
        except pa.ArrowInvalid as exc:
            raise InputError(f"{path}: not a readable Parquet file ({exc})") from None


def read_parquet_table(path: str, columns: list[str]) -> pa.Table:
    """A whole Parquet file through FileSystems; a damaged one is bad input naming the file."""
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        try:
            return pq.read_table(handle, columns=columns)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{path}: not a readable Parquet file ({exc})") from None


def parquet_schema(path: str) -> dict[str, Column]:
    """The file's columns."""
    schema = _parquet_footer(path).schema.to_arrow_schema()
    return {field.name: Column(field.name, *_arrow_kind(field.type)) for field in schema}


def footprint(files: list[str], file_format: str, column: str) -> tuple[int | None, int, int]:
    """(rows, bytes of `column` as a worker holds it, values per row of the list `column`) across a pool's
    files, from the Parquet footers only; for TFRecord, (None, the files' sizes, the first record's values):
    the size an upper bound, since counting would read them."""
    if file_format != "parquet":
        size = sum(m.size_in_bytes for match in FileSystems.match(files) for m in match.metadata_list)
        return None, size, _first_record_width(files, column)
    rows = size = values = 0
    for path in files:
        footer = _parquet_footer(path)
        rows += footer.num_rows
        for group in range(footer.num_row_groups):
            row_group = footer.row_group(group)
            chunks = [row_group.column(c) for c in range(row_group.num_columns)
                      if row_group.column(c).path_in_schema.split(".")[0] == column]
            size += sum(chunk.total_uncompressed_size for chunk in chunks)
            values += sum(chunk.num_values for chunk in chunks)
    return rows, size, math.ceil(values / rows) if rows else 0


def _first_record_width(files: list[str], column: str) -> int:
    """Values of the list feature `column` in the first record of the TFRecord files; 0 when they are empty."""
    for path in files:
        example = _first_example(path)
        if example is not None:
            feature = example.features.feature[column]
            kind = feature.WhichOneof("kind")
            return len(getattr(feature, kind).value) if kind else 0
    return 0


def _first_example(path: str):
    """The first record of a TFRecord file as a tf.train.Example; None for an empty file."""
    import tensorflow as tf
    for first in read_tfrecords(path, batch_size=1):
        try:
            return tf.train.Example.FromString(first[0])
        except Exception as exc:   # protobuf's DecodeError
            raise InputError(f"{path}: the first record is not a tf.train.Example ({exc})") from None
    return None


def tfrecord_schema(path: str) -> dict[str, Column]:
    """Feature kinds from the first record; an empty file gives an empty schema."""
    example = _first_example(path)
    if example is None:
        return {}
    columns = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        values = getattr(feature, kind).value if kind else []
        columns[name] = Column(
            name, {"int64_list": "int64", "float_list": "float", "bytes_list": "bytes"}.get(kind, "bytes"),
            # Fixed-length list features (embedding, probs) are lists; a single id/label/margin is a scalar.
            is_list=name in ("embedding", "probs") or len(values) != 1)
    return columns


EXPECTED_KINDS = {
    "id": ({"int64", "string", "bytes"}, False),
    "cluster_id": ({"int64"}, False),
    "embedding": ({"float"}, True),
    "probs": ({"float"}, True),
    "margin": ({"float"}, False),
    "label": ({"int64"}, False),
}


def check_schema(path: str, schema: dict[str, Column], required, optional=()) -> list[str]:
    """The columns to read; raises InputError naming the file and column."""
    present = []
    for name in list(required) + list(optional):
        column = schema.get(name)
        if column is None:
            if name in required:
                raise InputError(f"{path}: missing column {name!r} (columns: {', '.join(sorted(schema)) or 'none'})")
            continue
        kinds, is_list = EXPECTED_KINDS.get(name, (None, None))
        if kinds is not None and (column.kind not in kinds or column.is_list != is_list):
            shape = "list of " if column.is_list else ""
            raise InputError(f"{path}: column {name!r} has type {shape}{column.kind}; "
                             f"expected {'list of ' if is_list else ''}{'/'.join(sorted(kinds))}")
        present.append(name)
    return present


# ---------------------------------------------------------------- conversion

def _list_column_to_matrix(array, path: str, name: str, dtype=np.float32) -> np.ndarray:
    """A list<float> (or list<int>) Arrow column as an (n, d) float32 (int64) matrix, or a clear error."""
    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    n = len(array)
    if array.null_count:
        raise InputError(f"{path}: column {name!r} is null in {rows_text(array.null_count)}")
    if pa.types.is_fixed_size_list(array.type):
        width = array.type.list_size
        values = array.flatten()
    else:
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        width = int(np.bincount(lengths).argmax()) if n else 0
        bad = int(np.count_nonzero(lengths != width))
        if bad:
            raise InputError(f"{path}: column {name!r} has rows of different lengths: "
                             f"{bad} of {n} rows differ from length {width}")
        values = array.flatten()
    if values.null_count:
        raise InputError(f"{path}: column {name!r} has {values.null_count} null values")
    return values.to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(n, width)


def _id_column(array, path: str) -> tuple[np.ndarray, str]:
    array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
    if array.null_count:
        raise InputError(f"{path}: column 'id' is null in {rows_text(array.null_count)}")
    if pa.types.is_integer(array.type):
        return array.to_numpy(zero_copy_only=False).astype(np.int64, copy=False), "int64"
    id_type = "string" if (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)) else "binary"
    values = array.cast(pa.large_binary()).to_pylist()
    return np.array(values, dtype=object), id_type


# Model-input columns (any name) that are numeric lists become (n, width) matrices of these types.
_LIST_DTYPES = {"float": np.float32, "int64": np.int64}


def _numeric_list_dtype(arrow_type):
    kind, is_list = _arrow_kind(arrow_type)
    return _LIST_DTYPES.get(kind) if is_list else None


def table_to_batch(table: pa.Table, path: str) -> Batch:
    """Arrow table (one row group) -> Batch, checking list widths and nulls."""
    columns, id_type = {}, "int64"
    for name in table.column_names:
        array = table.column(name)
        if name == "id":
            columns["id"], id_type = _id_column(array, path)
        elif name in ("embedding", "probs"):
            columns[name] = _list_column_to_matrix(array, path, name)
        elif _numeric_list_dtype(array.type) is not None:
            columns[name] = _list_column_to_matrix(array, path, name, _numeric_list_dtype(array.type))
        else:
            if array.null_count:
                raise InputError(f"{path}: column {name!r} is null in {rows_text(array.null_count)}")
            values = array.to_numpy()
            columns[name] = values.astype(np.float32) if name == "margin" else values
    progress.add("rows read", table.num_rows)
    return Batch(path, columns, id_type)


# ---------------------------------------------------------------- reading

class ReadTFRecordFile(beam.DoFn):
    """Parses one TFRecord file a batch of records at a time."""

    def __init__(self, schema: dict, names: list[str], batch_size: int):
        self._schema = schema
        self._names = names
        self._batch_size = batch_size

    def setup(self):
        import tensorflow as tf
        dtypes = {"int64": tf.int64, "float": tf.float32, "bytes": tf.string}
        self._spec = {}
        for name in self._names:
            dtype = dtypes[self._schema[name].kind if self._schema[name].kind in dtypes else "bytes"]
            self._spec[name] = tf.io.RaggedFeature(dtype=dtype, row_splits_dtype=tf.int64)

    def process(self, path):
        import tensorflow as tf
        id_type = "binary" if self._schema["id"].kind == "bytes" else "int64"
        for serialized in read_tfrecords(path, self._batch_size):
            try:
                parsed = tf.io.parse_example(serialized, self._spec)
            except tf.errors.InvalidArgumentError as exc:
                raise InputError(f"{path}: cannot parse tf.train.Example records ({exc.message.splitlines()[0]})")
            columns = {}
            for name in self._names:
                ragged = parsed[name]
                lengths = ragged.row_lengths().numpy()
                values = ragged.flat_values.numpy()
                n = len(lengths)
                column = self._schema[name]
                if name in ("embedding", "probs") or (column.is_list and column.kind in _LIST_DTYPES):
                    width = int(np.bincount(lengths).argmax()) if n else 0
                    bad = int(np.count_nonzero(lengths != width))
                    if bad:
                        raise InputError(f"{path}: feature {name!r} has rows of different lengths: "
                                         f"{bad} of {n} rows differ from length {width}")
                    dtype = np.float32 if name in ("embedding", "probs") else _LIST_DTYPES[column.kind]
                    columns[name] = values.astype(dtype).reshape(n, width)
                else:
                    bad = int(np.count_nonzero(lengths != 1))
                    if bad:
                        raise InputError(f"{path}: feature {name!r} is missing or not a single value in "
                                         f"{rows_text(bad)}")
                    if name == "id" and id_type == "binary":
                        columns[name] = np.array(list(values), dtype=object)
                    else:
                        columns[name] = values
            progress.add("rows read", len(lengths))
            yield Batch(path, columns, id_type)


class ReadTable(beam.PTransform):
    """Columnar batches of `required` (+ present `optional`) columns of the files behind a glob.

    Schemas are checked on the driver while the pipeline is built, so a missing
    column fails before any work starts.
    """

    def __init__(self, pattern: str, required, optional=(), flag: str = "--pool", batch_size: int = 65536):
        super().__init__(label=f"Read{flag.strip('-').title().replace('-', '')}")
        self.files = match_files(pattern, flag)
        self.format = detect_format(self.files, flag)
        schema_of = parquet_schema if self.format == "parquet" else tfrecord_schema
        # Footers are cheap; with very many files, check a sample and let the readers check the rest.
        sample = self.files if len(self.files) <= 256 else self.files[:: len(self.files) // 256]
        schemas = [(path, schema_of(path)) for path in sample]
        schemas = [(path, schema) for path, schema in schemas if schema] or schemas
        self.columns = check_schema(schemas[0][0], schemas[0][1], required, optional)
        for path, schema in schemas[1:]:
            if check_schema(path, schema, required, optional) != self.columns:
                raise InputError(f"{path}: columns differ from {schemas[0][0]}")
        self.schema = schemas[0][1]
        self.batch_size = batch_size

    def expand(self, pbegin):
        files = pbegin | "Files" >> beam.Create(self.files)
        if self.format == "parquet":
            return (files
                    | "ReadParquet" >> beam.io.ReadAllFromParquetBatched(columns=self.columns, with_filename=True)
                    # A file or row group without rows (writers leave empty part files) has no list width.
                    | "SkipEmpty" >> beam.Filter(lambda path_and_table: path_and_table[1].num_rows > 0)
                    | "ToBatch" >> beam.MapTuple(lambda path, table: table_to_batch(table, path)))
        return (files
                | "Spread" >> beam.Reshuffle()
                | "ReadTFRecord" >> beam.ParDo(ReadTFRecordFile(self.schema, self.columns, self.batch_size)))


# ---------------------------------------------------------------- checks across files

def one_across_files(value_and_source, flag: str, column: str, what: str, default):
    """The value every file shares; an error naming a file of each value otherwise."""
    found = {}
    for value, source in value_and_source:
        found.setdefault(value, source)
    if len(found) > 1:
        detail = "; ".join(f"{value} in {source}" for value, source in sorted(found.items()))
        raise InputError(f"{flag}: column {column!r} has {what} across files: {detail}")
    return next(iter(found), default)


def first_file_of_each(dicts) -> dict:
    """{value: file} dicts of many batches -> one, with the first file in name order of each value (whatever
    order a combiner merges them in, so an error names the same files on every runner)."""
    out = {}
    for d in dicts:
        for key, source in d.items():
            out[key] = min(out.get(key, source), source)
    return out


def one_id_type(id_type_and_source, flag: str) -> str:
    return one_across_files(id_type_and_source, flag, "id", "different types", "int64")


def _id_types(batch: Batch) -> dict:
    return {batch.id_type: batch.source} if len(batch) else {}


class OneIdType(beam.PTransform):
    """Batches -> singleton: the id type ("int64", "string", "binary") of every file with rows.

    Ids of different types cannot be sorted or joined together, so a pool (or
    pool and clusters) mixing them fails with one InputError naming a file of
    each type, found by a combiner rather than where the first sort trips.
    """

    def __init__(self, flag: str):
        super().__init__()
        self.flag = flag

    def expand(self, batches):
        return (batches
                | "IdTypes" >> beam.Map(_id_types)
                | "AllIdTypes" >> beam.CombineGlobally(first_file_of_each)
                | "OneIdType" >> beam.Map(lambda found, flag: one_id_type(found.items(), flag), self.flag))


# ---------------------------------------------------------------- writing

def write_bytes_atomic(path: str, payload: bytes) -> None:
    """Write then rename, so readers never see a partial file."""
    temp = f"{path}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(temp) as handle:
        handle.write(payload)
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temp], [path])


def write_success(directory: str, completes: str) -> None:
    """The completion marker, written last: one line naming the summary it vouches for. Never empty: Beam's
    S3 file system cannot write an empty object (apache/beam#21369)."""
    write_bytes_atomic(FileSystems.join(directory, SUCCESS), f"{completes}\n".encode())


def write_json_atomic(path: str, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str):
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        return json.loads(handle.read().decode())


def shard_name(prefix: str, index: int, count: int, suffix: str) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}{suffix}"


class OutputDir:
    """An output directory whose files appear only when the whole run succeeded.

    Shards are written under a hidden temporary directory; `finalize` (the last
    step of the pipeline) removes any earlier outputs, renames the new shards
    into place and writes the summary JSON and then the completion marker.
    A directory holding a completed run is refused unless `overwrite` is set.
    Building the pipeline writes nothing.
    """

    def __init__(self, path: str, prefix: str, summary_name: str, marker: str | None, overwrite: bool):
        self.path = path.rstrip("/")
        self.prefix = prefix
        self.summary_name = summary_name
        self.marker = marker
        self.temp = FileSystems.join(self.path, f".tmp-{uuid.uuid4().hex[:12]}")
        self.created = not FileSystems.exists(self.path)  # a failed run leaves no directory it made
        done = self.join(marker or summary_name)
        # Only a check while the pipeline is built (a dry run writes nothing): the temporary directory appears
        # with its first shard, and leftovers of a run that never completed are replaced by finalize.
        if FileSystems.exists(done) and not overwrite:
            raise InputError(f"{self.path} already holds a completed run ({posixpath.basename(done)} exists); "
                             "pass --overwrite to replace it")

    def join(self, name: str) -> str:
        return FileSystems.join(self.path, name)

    def _existing_outputs(self) -> list[str]:
        pattern = FileSystems.join(self.path, self.prefix + "-*")
        return [m.path for m in FileSystems.match([pattern])[0].metadata_list]

    @staticmethod
    def _delete(paths):
        if paths:
            FileSystems.delete(list(paths))

    def temp_path(self, name: str) -> str:
        return FileSystems.join(self.temp, name)

    def finalize(self, names: list[str], summary: dict) -> None:
        for done in filter(None, [self.marker and self.join(self.marker), self.join(self.summary_name)]):
            if FileSystems.exists(done):
                FileSystems.delete([done])
        self._delete(p for p in self._existing_outputs() if posixpath.basename(p) not in names)
        existing = {posixpath.basename(p) for p in self._existing_outputs()}
        self._delete(self.join(n) for n in names if n in existing)
        FileSystems.rename([self.temp_path(n) for n in names], [self.join(n) for n in names])
        self.remove_temp()
        write_json_atomic(self.join(self.summary_name), summary)
        if self.marker:
            write_success(self.path, self.summary_name)

    def remove_temp(self) -> None:
        if FileSystems.exists(self.temp):
            FileSystems.delete([self.temp])

    def abandon(self) -> None:
        """After a failed run: the temporary files, and the output directory too if this run made it and
        nothing else is in it."""
        self.remove_temp()
        if self.created and FileSystems.exists(self.path) and not files_under(self.path):
            FileSystems.delete([self.path])


def write_parquet(path: str, table: pa.Table) -> None:
    with FileSystems.create(path) as handle:
        pq.write_table(table, handle, row_group_size=65536)


def files_under(directory: str) -> list[str]:
    """Every file below a directory, at any depth."""
    return [m.path for result in FileSystems.match([FileSystems.join(directory.rstrip("/"), "**")])
            for m in result.metadata_list]


def file_or_directory_exists(path: str) -> bool:
    """FileSystems.exists, true also for a directory on an object store, which is no object of its own."""
    return FileSystems.exists(path) or bool(files_under(path))


def read_tfrecords(path: str, batch_size: int = 65536):
    """The serialized records of one TFRecord file, in lists of up to `batch_size`.

    Read through Beam's FileSystems (so any scheme Beam has: gs://, s3://, hdfs://,
    local), with the framing and CRC checks of Beam's own TFRecord source; a damaged
    file is bad input naming it. A `.gz` file is decompressed.
    """
    from apache_beam.io.tfrecordio import _TFRecordUtil
    batch = []
    with FileSystems.open(path) as handle:
        while True:
            try:
                record = _TFRecordUtil.read_record(handle)
            except ValueError as exc:
                raise InputError(f"{path}: not a readable TFRecord file ({str(exc)[:120]})") from None
            if record is None:
                break
            batch.append(record)
            if len(batch) == batch_size:
                yield batch
                batch = []
    if batch:
        yield batch


def read_tfrecord_features(path: str, spec: dict, batch_size: int = 65536):
    """Batches of one TFRecord file's tf.train.Example records parsed by `spec` ({name: tf.io feature}),
    as {name: numpy array}; a file that is damaged or lacks a feature is bad input naming it."""
    import tensorflow as tf
    for records in read_tfrecords(path, batch_size):
        try:
            parsed = tf.io.parse_example(records, spec)
        except tf.errors.InvalidArgumentError as exc:
            raise InputError(f"{path}: cannot parse the records' features {sorted(spec)} "
                             f"({exc.message.splitlines()[0][:200]})") from None
        yield {name: value.numpy() for name, value in parsed.items()}


def write_tfrecords(path: str, records) -> None:
    from apache_beam.io.tfrecordio import _TFRecordUtil  # the framing WriteToTFRecord uses
    with FileSystems.create(path) as handle:
        for record in records:
            _TFRecordUtil.write_record(handle, record)


def ids_to_arrow(ids: np.ndarray, id_type: str) -> pa.Array:
    if id_type == "int64":
        return pa.array(ids, type=pa.int64())
    if id_type == "string":
        return pa.array([x.decode() for x in ids], type=pa.string())
    return pa.array(list(ids), type=pa.binary())


class WriteShards(beam.PTransform):
    """(shard index, shard count, payload) -> files in the output's temp dir, then finalize.

    `write(path, payload)` writes one shard; `summary(names, extra)` builds the
    summary JSON from the final file names and an optional side input.
    """

    def __init__(self, output: OutputDir, suffix: str, write, summary, extra=None):
        super().__init__()
        self.output, self.suffix = output, suffix
        self.write, self.summary, self.extra = write, summary, extra

    def expand(self, shards):
        output, suffix, write = self.output, self.suffix, self.write

        def write_one(element):
            index, count, payload = element
            name = shard_name(output.prefix, index, count, suffix)
            write(output.temp_path(name), payload)
            return name

        def finalize(names, extra=None):
            names = sorted(names)
            output.finalize(names, self.summary(names, extra))
            return names

        names = (shards
                 | "Spread" >> beam.Reshuffle()
                 | "WriteShard" >> beam.Map(write_one)
                 | "AllNames" >> beam.combiners.ToList())
        if self.extra is None:
            return names | "Finalize" >> beam.Map(finalize)
        return names | "Finalize" >> beam.Map(finalize, beam.pvalue.AsSingleton(self.extra))


def batch_to_examples(columns: dict) -> list[bytes]:
    """Rows as serialized tf.train.Example: ints -> int64_list, floats -> float_list, bytes -> bytes_list."""
    from tensorflow.core.example import example_pb2
    n = len(next(iter(columns.values())))
    plans = []
    for name, values in columns.items():
        if values.dtype == object:
            plans.append((name, "bytes_list", values, False))
        elif np.issubdtype(values.dtype, np.integer):
            plans.append((name, "int64_list", values.astype(np.int64).tolist(), False))
        else:
            as_list = values.ndim == 2
            plans.append((name, "float_list", values.astype(np.float32).tolist(), as_list))
    records = []
    for row in range(n):
        example = example_pb2.Example()
        features = example.features.feature
        for name, kind, values, as_list in plans:
            target = getattr(features[name], kind).value
            if as_list:
                target.extend(values[row])
            else:
                target.append(values[row])
        records.append(example.SerializeToString(deterministic=True))  # map order fixed: byte-identical files
    return records
