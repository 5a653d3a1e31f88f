"""`clusmar score`: embeddings, class probabilities and margins of the pool from a TensorFlow model.

pool (id + model input columns) ─ read in columnar batches ─ score with RunInference (one
element per columnar batch; one model call per --batch-size rows returns embedding and
probabilities; margins vectorised) ─ part files written after inference ─
scores-SSSSS-of-NNNNN.parquet, scoring.json, _SUCCESS

Models: a Keras .keras/.h5 file (embedding = --embedding-layer's output, by default the
input of the last Dense layer) or a SavedModel directory (--signature, default
serving_default; outputs --embedding-output, default 'embedding', and --probs-output,
default 'probs'). Model inputs are fed from the pool column of the same name, or as
--inputs INPUT=COLUMN[,COLUMN...] says (several columns are concatenated).

Margins: top-1 minus top-2 probability; with --multi-label (independent sigmoid
outputs) the multi-label rule, min over classes of |2p - 1|, over --classes only if
given. --outputs logits applies softmax (sigmoid with --multi-label) first.

The output is a pool for `clusmar cluster` (id, embedding) and `clusmar select`
(id, margin); --no-embeddings writes only id, probs and margin.
"""
from __future__ import annotations

import logging

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.utils import shared

from clusmar_beam.pipelines.options import CommonOptions, build_and_run, require
from clusmar_beam.transforms import storage
from clusmar_beam.core.batch import Batch
from clusmar_beam.core import margins
from clusmar_beam.transforms import coders, scoring
from clusmar_beam.core.errors import InputError

LOG = logging.getLogger("clusmar")
DEFAULT_BATCH_SIZE = 4096
ROWS_PER_SCORE_SHARD = 250_000
PREVIEW_ROWS = 16


class ScoreOptions(CommonOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--model", help="Keras .keras/.h5 file or TensorFlow SavedModel directory")
        parser.add_argument("--embedding-layer", dest="embedding_layer",
                            help="Keras: layer whose output is the embedding (default: the input of the last "
                                 "Dense layer)")
        parser.add_argument("--embedding-output", dest="embedding_output",
                            help="SavedModel: signature output holding the embedding (default: 'embedding')")
        parser.add_argument("--probs-output", dest="probs_output",
                            help="output holding class probabilities or logits (default: the Keras model's "
                                 "output; the SavedModel output 'probs', or its only other output)")
        parser.add_argument("--signature", help="SavedModel signature (default: serving_default)")
        parser.add_argument("--outputs", help="probs (default) | logits: what the probability output holds")
        parser.add_argument("--multi-label", dest="multi_label", action="store_true",
                            help="independent sigmoid outputs: margin = min over classes of |2p - 1|")
        parser.add_argument("--classes",
                            help="with --multi-label: class indices the margin is taken over, e.g. 0,3,7 or 2-5")
        parser.add_argument("--no-embeddings", dest="no_embeddings", action="store_true",
                            help="write only id, probs and margin (clustering needs embeddings once)")
        parser.add_argument("--inputs", action="append",
                            help="INPUT=COLUMN[,COLUMN...]: pool columns feeding a model input, concatenated "
                                 "(repeatable; default: the column named like the input)")
        parser.add_argument("--batch-size", dest="batch_size", type=int,
                            help=f"rows per model call (default {DEFAULT_BATCH_SIZE})")
        parser.add_argument("--compression",
                            help="Parquet compression of the scores: none (default), snappy, zstd, gzip, lz4")
        parser.add_argument("--rows-per-shard", dest="rows_per_shard", type=int,
                            help=f"rows per output file, at most (default {ROWS_PER_SCORE_SHARD})")


def parse_classes(text: str | None) -> tuple | None:
    """'0,3,7' or '2-5,9' -> (0, 3, 7) / (2, 3, 4, 5, 9); None stays None."""
    if text is None or text == "":
        return None
    classes = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                low, high = part.split("-", 1) if not part.startswith("-") else (part, "")
                classes.extend(range(int(low), int(high) + 1))
            else:
                classes.append(int(part))
        except ValueError:
            raise InputError(f"--classes {text!r}: expected class indices such as 0,3,7 or 2-5") from None
    if not classes or min(classes) < 0:
        raise InputError(f"--classes {text!r}: expected non-negative class indices such as 0,3,7 or 2-5")
    return tuple(sorted(set(classes)))


def parse_inputs_flags(values) -> dict:
    """--inputs 'INPUT=COL[,COL...]' (repeatable; a bare 'COL[,COL...]' for single-input models)."""
    mapping = {}
    for value in values or []:
        for entry in str(value).split(";"):
            entry = entry.strip()
            if not entry:
                continue
            name, _, cols = entry.rpartition("=")
            columns = tuple(c.strip() for c in cols.split(",") if c.strip())
            if not columns:
                raise InputError(f"--inputs {entry!r}: expected INPUT=COLUMN[,COLUMN...]")
            if name.strip() in mapping:
                raise InputError(f"--inputs: model input {name.strip()!r} given twice")
            mapping[name.strip()] = columns
    return mapping


def model_config(opts) -> scoring.ModelConfig:
    model = require(opts.model, "--model")
    outputs = opts.outputs or "probs"
    if outputs not in margins.OUTPUT_MODES:
        raise InputError(f"--outputs {outputs!r}: choose probs or logits")
    if opts.embedding_layer and opts.embedding_output and opts.embedding_layer != opts.embedding_output:
        raise InputError("give --embedding-layer (Keras) or --embedding-output (SavedModel), not both")
    embedding = opts.embedding_layer or opts.embedding_output
    if opts.no_embeddings and embedding:
        raise InputError("--no-embeddings: no embedding is written, so --embedding-layer/--embedding-output "
                         "have no effect; drop one of them")
    classes = parse_classes(opts.classes)
    if classes is not None and not opts.multi_label:
        raise InputError("--classes applies to multi-label models (--multi-label); a multi-class margin uses "
                         "all classes")
    return scoring.ModelConfig(path=model, embedding=embedding, probs_output=opts.probs_output,
                               signature=opts.signature, outputs=outputs, multi_label=bool(opts.multi_label),
                               classes=classes, with_embeddings=not opts.no_embeddings)


def preview_batch(reader: storage.ReadTable, rows: int = PREVIEW_ROWS) -> Batch | None:
    """The first few rows of the first non-empty file, read as the pipeline reads them."""
    for path in reader.files[:8]:
        if reader.format == "parquet":
            with FileSystems.open(path, compression_type="uncompressed") as handle:
                parquet = pq.ParquetFile(handle)
                first = next(parquet.iter_batches(batch_size=rows, columns=reader.columns), None)
                if first is None or not first.num_rows:
                    continue
                return storage.table_to_batch(pa.Table.from_batches([first]), path)
        else:
            parse = storage.ReadTFRecordFile(reader.schema, reader.columns, rows)  # the pipeline's own parser
            parse.setup()
            batch = next(iter(parse.process(path)), None)
            if batch is not None and len(batch):
                return batch
    return None


def _move_part(path: str, part: str) -> None:
    FileSystems.rename([part], [path])


def _number_parts(parts: list[dict], pool_glob: str, files: int):
    if not scoring.rows_in(parts):
        raise InputError(f"--pool {pool_glob!r}: the pool is empty (0 rows in {files} files)")
    parts = sorted(parts, key=lambda p: p["key"])
    for index, part in enumerate(parts):
        yield index, len(parts), part["part"]


def build(pipeline: beam.Pipeline, opts: ScoreOptions) -> storage.OutputDir:
    """The score step on `pipeline`: the model is loaded and checked on a few rows here, before any worker
    starts (and an in-process runner's workers reuse that load); returns the output directory."""
    pool_glob = require(opts.pool, "--pool")
    output_dir = require(opts.output, "--output")
    config = model_config(opts)
    batch_size = scoring.check_batch_size(DEFAULT_BATCH_SIZE if opts.batch_size is None else opts.batch_size)
    rows_per_shard = ROWS_PER_SCORE_SHARD if opts.rows_per_shard is None else opts.rows_per_shard
    if rows_per_shard <= 0:
        raise InputError(f"--rows-per-shard must be positive (got {rows_per_shard})")
    compression = opts.compression or "none"
    if compression not in scoring.COMPRESSIONS:
        raise InputError(f"--compression {compression!r}: choose one of {', '.join(scoring.COMPRESSIONS)}")
    mapping = parse_inputs_flags(opts.inputs)

    # Everything that can be checked before workers start is checked here: the model's layers and
    # outputs, the pool's columns against the model's inputs, and a few rows run through the model.
    handle = shared.Shared()   # the workers' handle too: an in-process runner reuses this load
    scorer = handle.acquire(lambda: scoring.load_scorer(config), tag=config.tag)
    probe = storage.ReadTable(pool_glob, required=["id"], flag="--pool")
    feeds = scoring.plan_feeds(scorer.inputs, probe.schema, mapping, probe.files[0], config.path)
    reader = storage.ReadTable(pool_glob, required=["id", *sorted({c for f in feeds for c in f.columns})],
                               flag="--pool", batch_size=max(batch_size, 65536))
    preview = preview_batch(reader)
    if preview is not None:
        scoring.score_batch(scorer, preview, feeds, batch_size)  # a bad model or pool fails here, not on workers
        if config.outputs == "logits" and not config.multi_label:
            raw = scorer([scoring.build_feed(preview, f) for f in feeds])[1]
            if raw.min() >= 0 and abs(raw.sum(axis=1) - 1).max() < 1e-4:
                LOG.warning("score: --outputs logits, but %s's output %r looks like probabilities (rows sum to 1)",
                            config.path, scorer.probs_name)
    output = storage.OutputDir(output_dir, "scores", "scoring.json", storage.SUCCESS, opts.overwrite)
    described = scorer.describe()
    inputs = {feed.spec.name: list(feed.columns) for feed in feeds}
    LOG.info("score: %d pool files (%s); model inputs %s; batch size %d", len(reader.files), reader.format,
             inputs, batch_size)

    def summary(names, parts):
        return {**described, "pool": pool_glob, "pool_files": len(reader.files), "pool_format": reader.format,
                "inputs": inputs, "outputs": config.outputs, "multi_label": config.multi_label,
                "classes": list(config.classes) if config.classes else None,
                "margin_rule": scoring.describe_margin_rule(config), "with_embeddings": config.with_embeddings,
                "batch_size": batch_size, **scoring.summarize_parts(parts), "files": names}

    batches = pipeline | reader
    coders.declare_batch_types(batches, reader.format)
    parts = (batches
             | "Score" >> scoring.ScorePool(config, feeds, batch_size, output.temp, rows_per_shard, handle,
                                                 compression, loaded=scorer)
             | "AllParts" >> beam.combiners.ToList())
    _ = (parts
         | "Number" >> beam.FlatMap(_number_parts, pool_glob, len(reader.files))
         | "Write" >> storage.WriteShards(output, ".parquet", _move_part, summary, parts))
    return output


def run(argv: list[str] | ScoreOptions | None = None) -> dict:
    """Run the pipeline from its flags (a list), or from typed values (a ScoreOptions); returns the summary."""
    info, result, seconds, output = build_and_run(ScoreOptions, argv, build, "score", "scoring.json")
    if info.get("dry_run"):
        return info
    info["metrics"] = scoring.log_metrics(result)
    info["seconds"] = seconds
    LOG.info("score: %d examples (embedding dim %s, %s classes, mean margin %.4f) in %.1f s -> %s; metrics %s",
             info["num_examples"], info["embedding_dim"], info["num_classes"], info["margin"]["mean"],
             info["seconds"], output, info["metrics"])
    return info
