"""The model retrained every simulated round: logistic regression, or a small Keras MLP whose
penultimate layer can re-embed the pool (as the paper clusters its model's embeddings)."""
from __future__ import annotations

import warnings

import numpy as np

MODELS = ("logistic", "mlp")


class Standardize:
    """Feature scaling fitted on the whole pool (no labels involved), shared by every model of a run."""

    def __init__(self, features: np.ndarray):
        self.mean = features.mean(axis=0)
        self.scale = features.std(axis=0)
        self.scale[self.scale == 0] = 1.0

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.scale).astype(np.float32)


class Logistic:
    def __init__(self, num_classes: int, seed: int, max_iter: int = 300):
        from sklearn.linear_model import LogisticRegression
        self.num_classes = num_classes
        self.model = LogisticRegression(C=1.0, max_iter=max_iter, random_state=seed)

    def fit(self, x, y):
        from sklearn.exceptions import ConvergenceWarning
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model.fit(x, y)
        return self

    def predict_proba(self, x) -> np.ndarray:
        """n x C probabilities; classes not among the labels yet get 0."""
        probs = np.zeros((len(x), self.num_classes), dtype=np.float32)
        probs[:, self.model.classes_] = self.model.predict_proba(x)
        return probs


class Mlp:
    def __init__(self, num_classes: int, seed: int, hidden: int = 256, embedding_dim: int = 128,
                 epochs: int = 20):
        self.num_classes, self.seed = num_classes, seed
        self.hidden, self.embedding_dim, self.epochs = hidden, embedding_dim, epochs
        self.model = None

    def fit(self, x, y):
        import tensorflow as tf
        tf.keras.utils.set_random_seed(self.seed)
        inputs = tf.keras.Input(shape=(x.shape[1],))
        h = tf.keras.layers.Dense(self.hidden, activation="relu")(inputs)
        h = tf.keras.layers.Dense(self.embedding_dim, activation="relu", name="embedding")(h)
        outputs = tf.keras.layers.Dense(self.num_classes, activation="softmax")(h)
        self.model = tf.keras.Model(inputs, outputs)
        self.model.compile(optimizer=tf.keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
        self.model.fit(x, y, epochs=self.epochs, batch_size=128, verbose=0, shuffle=True)
        self._embedder = tf.keras.Model(inputs, self.model.get_layer("embedding").output)
        return self

    def predict_proba(self, x) -> np.ndarray:
        return _in_chunks(self.model, x)

    def embed(self, x) -> np.ndarray:
        return _in_chunks(self._embedder, x)


def _in_chunks(model, x, rows: int = 8192) -> np.ndarray:
    """Direct calls: Keras' predict() traces a new function for every freshly trained model."""
    return np.concatenate([np.asarray(model(x[i:i + rows], training=False)) for i in range(0, len(x), rows)]
                          ).astype(np.float32)


def make_model(kind: str, num_classes: int, seed: int, epochs: int):
    return Logistic(num_classes, seed) if kind == "logistic" else Mlp(num_classes, seed, epochs=epochs)
