"""Scoring the pool with a TensorFlow model: embeddings, probabilities and margins.

A `Scorer` wraps one loaded model (a Keras `.keras`/`.h5` file or a TensorFlow
SavedModel directory) as a single compiled call that returns, for one batch of
rows, both the embedding (a named layer's output, or a signature output) and the
class scores. `ScorePool` runs it through Beam's RunInference
(`ScorerModelHandler`: one element is one columnar batch, the model loaded once
per worker process) and writes the scored columns as part files where they are
computed.  Margins are core.margins' (`--multi-label`, `--classes`, `--outputs
logits` choose the rule); the written `probs` are always probabilities.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler, RunInference
from apache_beam.transforms.window import GlobalWindows

from clusmar_beam.core import progress
from clusmar_beam.core.batch import Batch
from clusmar_beam.core.errors import InputError
from clusmar_beam.core import margins
from clusmar_beam.core.margins import to_probabilities
from clusmar_beam.transforms import coders, storage

LOG = logging.getLogger("clusmar")

# Pool columns with a meaning of their own in the contract: never guessed to be model inputs.
RESERVED_COLUMNS = frozenset({"id", "label", "embedding", "probs", "margin", "cluster_id"})
DEFAULT_EMBEDDING_OUTPUTS = ("embedding", "embeddings")
DEFAULT_PROBS_OUTPUTS = ("probs", "probabilities", "probability")
DEFAULT_LOGITS_OUTPUTS = ("logits",)
METRICS_NAMESPACE = "score"


# ---------------------------------------------------------------- configuration

@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which model, which of its outputs, and how to read them (picklable, hashable)."""
    path: str
    embedding: str | None = None        # Keras layer name / SavedModel output name; None = default
    probs_output: str | None = None     # Keras output or layer name / SavedModel output name
    signature: str | None = None        # SavedModel signature (default serving_default)
    outputs: str = "probs"              # "probs" | "logits"
    multi_label: bool = False
    classes: tuple | None = None        # multi-label: score only these class indices
    with_embeddings: bool = True

    @property
    def tag(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype name ("float32", "int64", "string", ...) and per-row shape."""
    name: str
    dtype: str
    shape: tuple            # without the batch dimension; None for unknown sizes

    def describe(self) -> str:
        return f"{self.name!r} ({self.dtype}, shape {_shape_text(self.shape)})"


def _shape_text(shape) -> str:
    return "(None" + "".join(f", {d}" for d in shape) + ")"


# ---------------------------------------------------------------- loading

def model_kind(path: str) -> str:
    """'keras' for a .keras/.h5 file, 'savedmodel' for a SavedModel directory; InputError otherwise.

    Looked up through Beam's FileSystems, so a model may live on any file system Beam has.
    """
    path = path.rstrip("/")
    if FileSystems.exists(FileSystems.join(path, "saved_model.pb")):
        return "savedmodel"
    if storage.files_under(path):
        raise InputError(f"--model {path!r}: a directory without saved_model.pb is not a TensorFlow SavedModel")
    if not FileSystems.exists(path):
        raise InputError(f"--model {path!r}: no such file or directory")
    if path.endswith((".keras", ".h5", ".hdf5")):
        return "keras"
    raise InputError(f"--model {path!r}: expected a Keras .keras (or .h5) file or a SavedModel directory")


_LOCAL_COPIES: dict[str, str] = {}


def local_model_path(path: str) -> str:
    """A path TensorFlow can load the model from: `path` itself when it is local, else a copy in a
    temporary directory made through Beam's FileSystems (TensorFlow reads only local files and gs://;
    Beam reads every file system it has, s3:// and hdfs:// included). One copy per process."""
    path = path.rstrip("/")
    if "://" not in path:
        return path
    if path not in _LOCAL_COPIES:
        import atexit
        import shutil
        import tempfile
        target = tempfile.mkdtemp(prefix="clusmar-model-")
        atexit.register(shutil.rmtree, target, True)
        files = storage.files_under(path)
        pairs = [(f, os.path.join(target, *f[len(path) + 1:].split("/"))) for f in files] if files else \
            [(path, os.path.join(target, path.rsplit("/", 1)[-1]))]
        for source, local in pairs:
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with FileSystems.open(source, compression_type=CompressionTypes.UNCOMPRESSED) as src, \
                    open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        _LOCAL_COPIES[path] = target if files else pairs[0][1]
    return _LOCAL_COPIES[path]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _numpy_dtype_name(dtype) -> str:
    import tensorflow as tf
    dtype = tf.as_dtype(dtype)
    return "string" if dtype == tf.string else dtype.name


class Scorer:
    """A loaded model as one call per batch: `scorer(feeds) -> (embedding | None, scores)`.

    `feeds` is a list of numpy arrays, one per entry of `inputs`, already of the
    input's dtype and shape. `scores` are the raw probability (or logit) outputs.
    """

    kind = "model"

    def __init__(self, config: ModelConfig):
        self.config = config
        self.inputs: list[InputSpec] = []
        self.embedding_name: str | None = None
        self.probs_name: str = ""
        self.embedding_dim: int | None = None
        self.num_classes: int | None = None
        self.load_seconds = 0.0
        self.load_reported = False
        self._fn = None

    def __call__(self, feeds):
        outputs = self._fn(*feeds)
        emb, scores = (outputs if self.embedding_name else (None, outputs[0]))
        return (None if emb is None else emb.numpy()), scores.numpy()

    def describe(self) -> dict:
        return {"model": self.config.path, "model_kind": self.kind, "signature": getattr(self, "signature", None),
                "embedding_output": self.embedding_name, "probs_output": self.probs_name,
                "inputs": [dataclasses.asdict(spec) for spec in self.inputs],
                "embedding_dim": self.embedding_dim, "num_classes": self.num_classes}

    def _check_output_shapes(self, embedding_shape, probs_shape, names_hint: str):
        """Static checks: the embedding is a vector per row, the scores are a class vector per row."""
        config = self.config
        if embedding_shape is not None:
            if embedding_shape.rank is not None and embedding_shape.rank != 2:
                raise InputError(f"--model {config.path!r}: embedding {self.embedding_name!r} has shape "
                                 f"{_tf_shape_text(embedding_shape)}, not one vector per example; choose another "
                                 f"{names_hint}")
            if embedding_shape.rank == 2:
                self.embedding_dim = embedding_shape[-1]
        if probs_shape.rank is not None and probs_shape.rank != 2:
            raise InputError(f"--model {config.path!r}: output {self.probs_name!r} has shape "
                             f"{_tf_shape_text(probs_shape)}, not a probability vector per example")
        if probs_shape.rank == 2 and probs_shape[-1] is not None:
            self.num_classes = probs_shape[-1]
            if self.num_classes < 2 and not config.multi_label:
                raise InputError(f"--model {config.path!r}: output {self.probs_name!r} has {self.num_classes} "
                                 "class; margins need at least 2 (for one sigmoid output pass --multi-label)")
            if config.classes and max(config.classes) >= self.num_classes:
                raise InputError(f"--classes: class {max(config.classes)} does not exist; output "
                                 f"{self.probs_name!r} has {self.num_classes} classes (0-{self.num_classes - 1})")


def _tf_shape_text(shape) -> str:
    return "unknown" if shape.rank is None else "(" + ", ".join(str(d) for d in shape.as_list()) + ")"


class KerasScorer(Scorer):
    """A Keras model cut into a sub-model with two outputs: the embedding layer and the class scores."""

    kind = "keras"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        import keras
        import tensorflow as tf
        if config.signature:
            raise InputError(f"--signature applies to SavedModel directories; {config.path!r} is a Keras file")
        try:
            model = keras.saving.load_model(local_model_path(config.path), compile=False)
        except Exception as exc:  # Keras raises many types for unreadable / unsupported files
            raise InputError(f"--model {config.path!r}: cannot load the Keras model ({_first_line(exc)})") from exc
        self.model = model
        layers = _all_layers(model)
        try:
            model_inputs = list(model.inputs)
            model_outputs = list(model.outputs)
        except (AttributeError, ValueError) as exc:
            raise InputError(f"--model {config.path!r}: the model has no defined inputs/outputs "
                             f"(build it with keras.Input before saving)") from exc
        output_names = [_tensor_layer_name(t) for t in model_outputs]
        layer_list = ", ".join(f"{l.name} {_layer_shape(l)}" for l in layers)

        # class scores: the model's output (or a named output / layer)
        if config.probs_output:
            if config.probs_output in output_names:
                probs = model_outputs[output_names.index(config.probs_output)]
            else:
                layer = next((l for l in layers if l.name == config.probs_output), None)
                if layer is None:
                    raise InputError(f"--probs-output {config.probs_output!r}: no such output or layer in "
                                     f"{config.path!r} (outputs: {', '.join(output_names)}; layers: {layer_list})")
                probs = _layer_output(layer, config.path, "--probs-output")
            self.probs_name = config.probs_output
        else:
            if len(model_outputs) != 1:
                raise InputError(f"--model {config.path!r} has {len(model_outputs)} outputs "
                                 f"({', '.join(output_names)}); pass --probs-output NAME")
            probs, self.probs_name = model_outputs[0], output_names[0]

        # embedding: a named layer's output, or by default the input of the last Dense layer
        emb = None
        if config.with_embeddings:
            if config.embedding:
                layer = next((l for l in layers if l.name == config.embedding), None)
                if layer is None:
                    raise InputError(f"--embedding-layer {config.embedding!r}: no such layer in {config.path!r} "
                                     f"(layers: {layer_list})")
                emb = _layer_output(layer, config.path, "--embedding-layer")
                self.embedding_name = config.embedding
            else:
                # a top-level layer: the inputs of layers inside nested models are not tensors of this graph
                dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
                if not dense:
                    raise InputError(f"--model {config.path!r} has no Dense layer whose input is the default "
                                     f"embedding; pass --embedding-layer NAME (layers: {layer_list})")
                try:
                    emb = dense[-1].input
                except (AttributeError, ValueError) as exc:
                    raise InputError(f"--model {config.path!r}: cannot take the input of layer {dense[-1].name!r} "
                                     f"({_first_line(exc)}); pass --embedding-layer NAME") from exc
                self.embedding_name = f"input of {dense[-1].name}"
            if isinstance(emb, (list, tuple)):
                raise InputError(f"--embedding-layer: {self.embedding_name!r} has several outputs; choose a layer "
                                 f"with one (layers: {layer_list})")
        self._check_output_shapes(None if emb is None else tf.TensorShape(emb.shape), tf.TensorShape(probs.shape),
                                  f"--embedding-layer (layers: {layer_list})")

        self.inputs = [InputSpec(_tensor_layer_name(t), _numpy_dtype_name(t.dtype), tuple(t.shape[1:]))
                       for t in model_inputs]
        try:
            sub = keras.Model(model_inputs, [emb, probs] if emb is not None else [probs])
        except Exception as exc:
            raise InputError(f"--model {config.path!r}: cannot build the scoring sub-model "
                             f"({_first_line(exc)})") from exc
        self.submodel = sub
        signature = [tf.TensorSpec((None, *spec.shape), tf.string if spec.dtype == "string" else spec.dtype,
                                   name=spec.name) for spec in self.inputs]

        @tf.function(input_signature=signature, reduce_retracing=True)
        def call(*xs):
            out = sub(list(xs), training=False)
            return tuple(out) if isinstance(out, (list, tuple)) else (out,)

        self._fn = call


def _all_layers(model) -> list:
    """Layers in order, including those of nested models (their names are what users see in summary())."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if hasattr(layer, "layers") and getattr(layer, "layers", None):
            found.extend(_all_layers(layer))
    return found


def _tensor_layer_name(tensor) -> str:
    history = getattr(tensor, "_keras_history", None)
    if history is not None:
        return history[0].name
    return getattr(tensor, "name", "output")


def _layer_shape(layer) -> str:
    try:
        return str(tuple(layer.output.shape))
    except Exception:  # layers used more than once, or never called, have no single output
        return "(?)"


def _layer_output(layer, path: str, flag: str):
    try:
        return layer.output
    except (AttributeError, ValueError) as exc:
        raise InputError(f"{flag} {layer.name!r}: the layer of {path!r} has no single output "
                         f"({_first_line(exc)})") from exc


class SavedModelScorer(Scorer):
    """One signature of a SavedModel; one call returns all its named outputs."""

    kind = "savedmodel"

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        import tensorflow as tf
        try:
            self.loaded = tf.saved_model.load(local_model_path(config.path))
        except Exception as exc:
            raise InputError(f"--model {config.path!r}: cannot load the SavedModel ({_first_line(exc)})") from exc
        signatures = dict(self.loaded.signatures)
        self.signature = config.signature or "serving_default"
        if self.signature not in signatures:
            raise InputError(f"--signature {self.signature!r}: no such signature in {config.path!r} "
                             f"(signatures: {', '.join(sorted(signatures)) or 'none'})")
        fn = signatures[self.signature]
        args, kwargs = fn.structured_input_signature
        outputs = fn.structured_outputs
        if not isinstance(outputs, dict):
            outputs = {"output_0": outputs}
        listing = ", ".join(f"{name} {_tf_shape_text(spec.shape)}" for name, spec in sorted(outputs.items()))
        where = f"signature {self.signature!r} of {config.path!r}"

        if config.with_embeddings and config.embedding and config.embedding not in outputs:
            raise InputError(f"--embedding-output {config.embedding!r}: no such output in {where} "
                             f"(outputs: {listing})")
        if config.probs_output:
            if config.probs_output not in outputs:
                raise InputError(f"--probs-output {config.probs_output!r}: no such output in {where} "
                                 f"(outputs: {listing})")
            self.probs_name = config.probs_output
        else:
            preferred = DEFAULT_LOGITS_OUTPUTS + DEFAULT_PROBS_OUTPUTS if config.outputs == "logits" \
                else DEFAULT_PROBS_OUTPUTS + DEFAULT_LOGITS_OUTPUTS
            found = [name for name in preferred if name in outputs]
            others = [name for name in outputs if name not in DEFAULT_EMBEDDING_OUTPUTS and name != config.embedding]
            if found:
                self.probs_name = found[0]
            elif len(others) == 1:
                self.probs_name = others[0]
            else:
                raise InputError(f"{where}: which output holds the class probabilities? pass --probs-output NAME "
                                 f"(outputs: {listing})")
        if config.with_embeddings:
            if config.embedding:
                self.embedding_name = config.embedding
            else:
                found = [name for name in DEFAULT_EMBEDDING_OUTPUTS if name in outputs]
                if not found:
                    raise InputError(f"{where} has no output named 'embedding': pass --embedding-output NAME, "
                                     f"or --no-embeddings to score margins only (outputs: {listing})")
                self.embedding_name = found[0]
            if self.embedding_name == self.probs_name:
                raise InputError(f"{where}: the embedding and probability outputs are both {self.probs_name!r}")
        self._check_output_shapes(outputs[self.embedding_name].shape if self.embedding_name else None,
                                  outputs[self.probs_name].shape, f"--embedding-output (outputs: {listing})")
        if args:
            raise InputError(f"{where} takes positional inputs; export it with named inputs")
        self.inputs = []
        for name, spec in sorted(kwargs.items()):
            shape = tuple(spec.shape.as_list()[1:]) if spec.shape.rank else ()
            self.inputs.append(InputSpec(name, _numpy_dtype_name(spec.dtype), shape))
        names = [spec.name for spec in self.inputs]
        embedding_name, probs_name = self.embedding_name, self.probs_name

        def call(*xs):
            result = fn(**dict(zip(names, xs)))
            return (result[embedding_name], result[probs_name]) if embedding_name else (result[probs_name],)

        self._fn = call


def load_scorer(config: ModelConfig) -> Scorer:
    """Load the model of `config` and check its layers/outputs; times the load."""
    start = time.perf_counter()
    kind = model_kind(config.path)
    scorer = KerasScorer(config) if kind == "keras" else SavedModelScorer(config)
    scorer.load_seconds = time.perf_counter() - start
    LOG.info("score: loaded %s model %s in %.2f s (embedding: %s, scores: %s)", kind, config.path,
             scorer.load_seconds, scorer.embedding_name, scorer.probs_name)
    return scorer


# ---------------------------------------------------------------- inputs

@dataclasses.dataclass(frozen=True)
class Feed:
    """Model input `spec` is fed by these pool columns, concatenated along the feature axis."""
    spec: InputSpec
    columns: tuple


_COMPATIBLE_KINDS = {"float": ("float", "int64"), "int": ("int64",), "string": ("string", "bytes"), "bool": ("int64",)}


def _dtype_family(dtype: str) -> str:
    if dtype == "string":
        return "string"
    if dtype == "bool":
        return "bool"
    return "float" if np.issubdtype(np.dtype(dtype), np.floating) else "int"


def plan_feeds(inputs: list[InputSpec], schema: dict, mapping: dict, path: str, model_path: str) -> list[Feed]:
    """Which pool columns feed which model input; InputError naming the input, column and file."""
    columns_text = ", ".join(f"{name} ({'list of ' if col.is_list else ''}{col.kind})"
                             for name, col in schema.items())
    names = [spec.name for spec in inputs]
    unknown = [name for name in mapping if name and name not in names]
    if unknown:
        raise InputError(f"--inputs: {unknown[0]!r} is not an input of {model_path!r} "
                         f"(inputs: {', '.join(spec.describe() for spec in inputs)})")
    if "" in mapping and len(inputs) != 1:
        raise InputError(f"--inputs: {model_path!r} has {len(inputs)} inputs; name them as INPUT=COLUMN "
                         f"(inputs: {', '.join(names)})")
    candidates = [name for name in schema if name not in RESERVED_COLUMNS]
    feeds = []
    for spec in inputs:
        if spec.name in mapping or ("" in mapping and len(inputs) == 1):
            columns = mapping.get(spec.name) or mapping[""]
        elif spec.name in schema:
            columns = (spec.name,)
        elif len(inputs) == 1 and len(candidates) == 1:
            columns = (candidates[0],)
        elif len(inputs) == 1 and candidates and _all_scalar_numeric(schema, candidates) \
                and _fixed_width(spec) == len(candidates):
            columns = tuple(candidates)     # one scalar feature column per input position, in pool order
        else:
            raise InputError(f"{path}: no pool column for model input {spec.describe()} of {model_path!r}; "
                             f"name it like the input or pass --inputs {spec.name}=COLUMN (columns: {columns_text})")
        for column in columns:
            if column not in schema:
                raise InputError(f"{path}: missing column {column!r} needed by model input {spec.describe()} "
                                 f"(columns: {columns_text})")
            kind = schema[column].kind
            family = _dtype_family(spec.dtype)
            if kind not in _COMPATIBLE_KINDS[family]:
                raise InputError(f"{path}: column {column!r} has type {'list of ' if schema[column].is_list else ''}"
                                 f"{kind}, but model input {spec.describe()} needs {family} values")
        feeds.append(Feed(spec, tuple(columns)))
    return feeds


def _all_scalar_numeric(schema, names) -> bool:
    return all(not schema[n].is_list and schema[n].kind in ("float", "int64") for n in names)


def _fixed_width(spec: InputSpec):
    if any(d is None for d in spec.shape):
        return None
    return int(np.prod(spec.shape)) if spec.shape else 1


def build_feed(batch: Batch, feed: Feed) -> np.ndarray:
    """The model input array for one batch: columns concatenated, cast and reshaped; InputError if they don't fit."""
    spec = feed.spec
    n = len(batch)
    parts = []
    for column in feed.columns:
        values = batch.columns[column]
        parts.append(values.reshape(n, 1) if values.ndim == 1 else values.reshape(n, -1))
    x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    label = feed.columns[0] if len(feed.columns) == 1 else "+".join(feed.columns)
    family = _dtype_family(spec.dtype)
    if family == "string":
        if x.dtype != object and x.dtype.kind not in "SU":
            raise InputError(f"{batch.source}: column {label!r} holds {x.dtype} values, but model input "
                             f"{spec.describe()} needs strings")
    elif x.dtype == object or x.dtype.kind in "SU":
        raise InputError(f"{batch.source}: column {label!r} holds text/bytes, but model input {spec.describe()} "
                         "needs numbers")
    elif family in ("int", "bool") and np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{batch.source}: column {label!r} holds floating-point values, but model input "
                         f"{spec.describe()} needs integers")
    else:
        x = x.astype(spec.dtype, copy=False)
        if family == "float":
            finite = np.isfinite(x).all(axis=1)
            if not finite.all():
                bad = np.flatnonzero(~finite)
                raise InputError(f"{batch.source}: column {label!r} has NaN or infinite values in {len(bad)} of "
                                 f"{n} rows (e.g. id {_id_text(batch.ids[bad[0]])}); model input "
                                 f"{spec.describe()} needs finite numbers")
    width = x.shape[1]
    shape = spec.shape
    unknown = [i for i, d in enumerate(shape) if d is None]
    known = int(np.prod([d for d in shape if d is not None])) if shape else 1
    if not shape:
        ok = width == 1
        target = (n,)
    elif not unknown:
        ok = width == known
        target = (n, *shape)
    elif len(unknown) == 1:
        ok = width % known == 0 if known else False
        target = (n, *[width // known if d is None else d for d in shape])
    else:
        ok = len(shape) == 1
        target = (n, width)
    if not ok:
        raise InputError(f"{batch.source}: column {label!r} has {width} values per row, but model input "
                         f"{spec.describe()} needs {known if not unknown else f'a multiple of {known}'}")
    return x.reshape(target)


# ---------------------------------------------------------------- scores -> probabilities -> margins

def _check_finite(values: np.ndarray, name: str, where: str, ids: np.ndarray) -> None:
    finite = np.isfinite(values)
    bad = ~finite.all(axis=tuple(range(1, finite.ndim))) if finite.ndim > 1 else ~finite
    count = int(np.count_nonzero(bad))
    if count:
        first = ids[np.flatnonzero(bad)[0]]
        first = first.decode(errors="replace") if isinstance(first, bytes) else first
        raise InputError(f"{where}: output {name!r} has NaN or infinite values in {count} of {len(values)} rows "
                         f"(e.g. id {first})")


class Metrics:
    """The Beam metrics of scoring (namespace `score`)."""

    def __init__(self):
        counter, distribution = beam.metrics.Metrics.counter, beam.metrics.Metrics.distribution
        self.examples = counter(METRICS_NAMESPACE, "examples_scored")
        self.batches = counter(METRICS_NAMESPACE, "batches")
        self.batch_latency = distribution(METRICS_NAMESPACE, "batch_latency_us")
        self.model_load = distribution(METRICS_NAMESPACE, "model_load_ms")
        self.model_loads = counter(METRICS_NAMESPACE, "model_loads")


def _input_errors() -> tuple:
    """What a model call raises when the rows don't fit the graph (shape, dtype, values).

    Anything else (out of memory, internal TF errors) is not the input's fault and must
    surface as itself, with its traceback, not as "bad input".
    """
    import tensorflow as tf
    return tf.errors.InvalidArgumentError, ValueError, TypeError


def score_batch(scorer: Scorer, batch: Batch, feeds: list[Feed], batch_size: int,
                metrics: Metrics | None = None) -> dict:
    """One pool batch -> {"id", "embedding" (or None), "probs", "margin"}: one model call per `batch_size` rows."""
    config = scorer.config
    n = len(batch)
    arrays = [build_feed(batch, feed) for feed in feeds]
    embeddings, scores = [], []
    for start in range(0, n, batch_size):
        chunk = [a[start:start + batch_size] for a in arrays]
        began = time.perf_counter()
        try:
            emb, out = scorer(chunk)
        except InputError:
            raise
        except _input_errors() as exc:
            raise InputError(f"{batch.source}: model {config.path!r} failed on this file's rows "
                             f"({_first_line(exc)})") from exc
        if metrics is not None:
            metrics.batch_latency.update(int((time.perf_counter() - began) * 1e6))
            metrics.batches.inc()
        embeddings.append(emb)
        scores.append(out)
    if n == 0:
        return None
    scores = scores[0] if len(scores) == 1 else np.concatenate(scores)
    where = f"{batch.source}: model {config.path!r} output {scorer.probs_name!r}"
    _check_finite(scores, scorer.probs_name, f"{batch.source}: model {config.path!r}", batch.ids)
    probs = to_probabilities(scores, config.outputs, config.multi_label, where)
    if config.classes and max(config.classes) >= probs.shape[1]:
        raise InputError(f"--classes: class {max(config.classes)} does not exist; output "
                         f"{scorer.probs_name!r} has {probs.shape[1]} classes")
    emb = None
    if scorer.embedding_name:
        emb = embeddings[0] if len(embeddings) == 1 else np.concatenate(embeddings)
        emb = emb.reshape(n, -1).astype(np.float32, copy=False)
        _check_finite(emb, scorer.embedding_name, f"{batch.source}: model {config.path!r}", batch.ids)
    if metrics is not None:
        metrics.examples.inc(n)
    progress.add("rows scored", n)
    return {"id": batch.ids, "id_type": batch.id_type, "source": batch.source, "embedding": emb, "probs": probs,
            "margin": margins.margins(probs, config.multi_label, config.classes)}


# ---------------------------------------------------------------- output tables

def float_lists(matrix: np.ndarray) -> pa.Array:
    """(n, d) float32 -> Arrow list<float32> without a Python loop."""
    n, d = matrix.shape
    values = pa.array(np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1), type=pa.float32())
    if n * d < 2 ** 31:
        return pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int32) if d else
                                                 np.zeros(n + 1, dtype=np.int32)), values)
    return pa.LargeListArray.from_arrays(pa.array(np.arange(0, (n + 1) * d, d, dtype=np.int64)), values)


def scores_table(results: list[dict]) -> pa.Table:
    """Scored results -> the `scores` table: id, embedding (if any), probs, margin (one chunk per result, no copy)."""
    tables = []
    for r in results:
        columns = {"id": storage.ids_to_arrow(r["id"], r["id_type"])}
        if r["embedding"] is not None:
            columns["embedding"] = float_lists(r["embedding"])
        columns["probs"] = float_lists(r["probs"])
        columns["margin"] = pa.array(r["margin"], type=pa.float32())
        tables.append(pa.table(columns))
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


COMPRESSIONS = ("none", "snappy", "zstd", "gzip", "lz4")


def write_scores(path: str, table: pa.Table, compression: str = "none") -> None:
    """Like `storage.write_parquet`, tuned for wide float lists: no dictionary pages, statistics only on id and
    margin (both cost more than the model on 228 floats per row), no compression by default (embeddings
    and probabilities shrink by under a fifth)."""
    import pyarrow.parquet as pq
    with FileSystems.create(path) as handle:
        pq.write_table(table, handle, compression=compression, use_dictionary=False,
                       write_statistics=[name for name in ("id", "margin") if name in table.column_names])


def _id_text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------- RunInference

class Scored(dict):
    """One batch's scores (the dict of `score_batch`), typed so that Beam sizes it from its arrays."""


class ScoredCoder(coders.SizedPickleCoder):
    """Beam samples element sizes by encoding them; a pickle of every embedding would cost more than scoring it."""

    def estimate_size(self, value) -> int:
        if value is None:
            return 8
        return sum(v.nbytes if v.dtype != object else 16 * len(v) for v in value.values()
                   if isinstance(v, np.ndarray)) + 64

    def to_type_hint(self):
        return Scored


beam.coders.registry.register_coder(Scored, ScoredCoder)


class ScorerModelHandler(ModelHandler):
    """RunInference's view of a `Scorer`: one element is one columnar `Batch`, one result its scored dict.

    Rows are already batched by the reader, so RunInference batches one element at a
    time (max_batch_size=1); the model-call size stays `batch_size`. Each result keeps
    its batch's source file and ids, so no key is needed to tie it back.
    `shared_handle` lets an in-process runner reuse the model the driver loaded: `loaded`,
    that model, is held here while the pipeline exists (and never pickled), so the handle
    still has it when the workers start.
    """

    def __init__(self, config: ModelConfig, feeds: list[Feed], batch_size: int, shared_handle=None,
                 loaded: Scorer | None = None):
        super().__init__(min_batch_size=1, max_batch_size=1)
        self._config = config
        self._feeds = feeds
        self._batch_size = batch_size
        self._shared = shared_handle
        self._loaded = loaded
        self._metrics = None

    def load_model(self) -> Scorer:
        config = self._config
        if self._shared is None:
            return load_scorer(config)
        return self._shared.acquire(lambda: load_scorer(config), tag=config.tag)

    def run_inference(self, batch, model: Scorer, inference_args=None):
        if self._metrics is None:
            self._metrics = Metrics()
        if not model.load_reported:   # once per load, from a context where metrics are recorded
            model.load_reported = True
            self._metrics.model_load.update(int(model.load_seconds * 1000))
            self._metrics.model_loads.inc()
        results = []
        for element in batch:
            result = score_batch(model, element, self._feeds, self._batch_size, self._metrics)
            results.append(None if result is None else Scored(result))
        return results

    def get_num_bytes(self, batch) -> int:
        # the default pickles the batch: a full copy of every feature column
        return sum(int(getattr(v, "nbytes", 0)) for element in batch for v in element.columns.values())

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE

    def __getstate__(self):
        return {**self.__dict__, "_metrics": None, "_loaded": None}


def split_rows(batch: Batch, rows_per_part: int):
    """Slices of at most `rows_per_part` rows (none for an empty batch): a part file never needs more
    than one slice's scores."""
    if 0 < len(batch) <= rows_per_part:
        yield batch
        return
    for start in range(0, len(batch), rows_per_part):
        yield batch.take(slice(start, start + rows_per_part))


class WriteScoreParts(beam.DoFn):
    """Scored results -> part files in `temp_dir`; emits one small record per part.

    Runs fused after inference, so the heavy columns never cross a shuffle: results
    are buffered up to `rows_per_part` rows and written as one Parquet file, and only
    the part's name and statistics move on.
    """

    def __init__(self, temp_dir: str, rows_per_part: int, compression: str = "none"):
        self._temp_dir = temp_dir
        self._rows_per_part = rows_per_part
        self._compression = compression

    def start_bundle(self):
        self._buffer, self._buffered = [], 0

    def process(self, result: dict | None):
        if result is None:
            return
        self._buffer.append(result)
        self._buffered += len(result["margin"])
        if self._buffered >= self._rows_per_part:
            yield self._flush()

    def finish_bundle(self):
        if self._buffer:
            yield GlobalWindows.windowed_value(self._flush())

    def _flush(self) -> dict:
        import uuid
        results, self._buffer, self._buffered = self._buffer, [], 0
        table = scores_table(results)
        path = FileSystems.join(self._temp_dir, f"part-{uuid.uuid4().hex}.parquet")
        write_scores(path, table, self._compression)
        margin = table.column("margin").to_numpy()
        first = results[0]
        return {"part": path, "rows": len(table), "key": (first["source"], _id_text(first["id"][0])),
                "margin_sum": float(margin.sum(dtype=np.float64)), "margin_min": float(margin.min()),
                "margin_max": float(margin.max()), "num_classes": int(first["probs"].shape[1]),
                "embedding_dim": None if first["embedding"] is None else int(first["embedding"].shape[1])}


class ScorePool(beam.PTransform):
    """PCollection of pool `Batch` -> PCollection of scored part records (RunInference, then `WriteScoreParts`)."""

    def __init__(self, config: ModelConfig, feeds: list[Feed], batch_size: int, temp_dir: str,
                 rows_per_part: int, shared_handle=None, compression: str = "none", loaded: Scorer | None = None):
        super().__init__()
        self._rows_per_part = rows_per_part
        self._handler = ScorerModelHandler(config, feeds, batch_size, shared_handle, loaded)
        self._write = WriteScoreParts(temp_dir, rows_per_part, compression)

    def expand(self, batches):
        # typed so that Beam's size sampling uses the cheap coders, not a pickle per element
        slices = batches | "SplitRows" >> beam.FlatMap(split_rows, self._rows_per_part).with_output_types(Batch)
        scored = slices | "RunInference" >> RunInference(self._handler)
        scored.element_type = Scored
        return scored | "WriteParts" >> beam.ParDo(self._write)


def summarize_parts(parts: list[dict]) -> dict:
    rows = sum(p["rows"] for p in parts)
    dims = {p["embedding_dim"] for p in parts}
    classes = {p["num_classes"] for p in parts}
    return {"num_examples": rows,
            "embedding_dim": dims.pop() if len(dims) == 1 else sorted(dims, key=lambda d: (d is None, d)),
            "num_classes": classes.pop() if len(classes) == 1 else sorted(classes),
            "margin": {"mean": sum(p["margin_sum"] for p in parts) / rows if rows else None,
                       "min": min((p["margin_min"] for p in parts), default=None),
                       "max": max((p["margin_max"] for p in parts), default=None)}}


def rows_in(parts) -> int:
    return sum(p["rows"] for p in parts)


def log_metrics(result) -> dict:
    """The `score` metrics of a finished pipeline as a plain dict (committed values)."""
    found = {}
    try:
        query = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(METRICS_NAMESPACE))
    except Exception:  # some runners do not report metrics
        return found
    for counter in query.get("counters", []):
        found[counter.key.metric.name] = found.get(counter.key.metric.name, 0) + counter.committed
    for dist in query.get("distributions", []):
        value = dist.committed
        if value is None or not value.count:
            continue
        found[dist.key.metric.name] = {"count": value.count, "mean": value.mean, "min": value.min,
                                       "max": value.max}
    return found


def describe_margin_rule(config: ModelConfig) -> str:
    if config.multi_label:
        subset = "" if config.classes is None else f" over classes {list(config.classes)}"
        return f"min over classes{subset} of |2p - 1| (multi-label)"
    return "top-1 minus top-2 probability"


def check_batch_size(value: int) -> int:
    if value is None or value <= 0 or not math.isfinite(value):
        raise InputError(f"--batch-size must be a positive number of rows (got {value})")
    return int(value)
