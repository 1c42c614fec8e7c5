"""serval quickstart: a real model served over HTTP.

A scikit-learn classifier of handwritten digits (the 8x8 images scikit-learn ships; nothing
is downloaded) is trained when each replica starts, and served behind a FastAPI ingress:

    pip install -e '.[quickstart]'
    python examples/quickstart.py            # trains, then serves on http://127.0.0.1:8000
    python examples/quickstart_client.py     # in another terminal: accuracy and latency

The code is Ray Serve's: with `from ray import serve` instead of `import serval as serve` it
runs on Ray Serve unchanged.

- `Classifier` holds the model; `@serve.batch` gathers the requests that arrive together
  into one `predict_proba` call over a matrix (numpy's speed is per call, not per row).
- `DigitsAPI` is the HTTP ingress: a pydantic body checked by FastAPI (a malformed one is a
  422), a call through a handle to the classifier, a pydantic answer.

Ctrl-C stops it (every serval process exits with it).
"""

from __future__ import annotations

import time

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import serval as serve
from serval.handle import DeploymentHandle

PIXELS = 64  # 8 x 8 grey levels, 0 (white) to 16 (black)


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, held-out images, train labels, held-out labels): the same split in the
    replicas (which train on the first part) and in the client (which asks about the rest)."""
    images, labels = load_digits(return_X_y=True)
    parts: list[np.ndarray] = train_test_split(
        images, labels, test_size=0.25, random_state=0, stratify=labels
    )
    return parts[0], parts[1], parts[2], parts[3]


class Digit(BaseModel):
    pixels: list[float] = Field(min_length=PIXELS, max_length=PIXELS)


class Prediction(BaseModel):
    digit: int
    confidence: float


@serve.deployment(num_replicas=2, max_ongoing_requests=64)
class Classifier:
    def __init__(self) -> None:
        train_images, _, train_labels, _ = digits_split()
        started = time.perf_counter()
        self.model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        self.model.fit(train_images, train_labels)
        self.trained_in_s = time.perf_counter() - started

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)
    async def predict(self, images: list[list[float]]) -> list[dict[str, float]]:
        probabilities = self.model.predict_proba(np.asarray(images, dtype=np.float64))
        best = probabilities.argmax(axis=1)
        return [
            {"digit": int(self.model.classes_[i]), "confidence": float(p[i])}
            for i, p in zip(best, probabilities, strict=True)
        ]


app = FastAPI(title="digits")


@serve.deployment
@serve.ingress(app)
class DigitsAPI:
    def __init__(self, classifier: DeploymentHandle) -> None:
        self.classifier = classifier

    @app.post("/predict")
    async def predict(self, digit: Digit) -> Prediction:
        if not all(0.0 <= v <= 16.0 for v in digit.pixels):
            raise HTTPException(status_code=422, detail="pixels are grey levels from 0 to 16")
        answer = await self.classifier.predict.remote(digit.pixels)
        return Prediction(**answer)

    @app.get("/")
    def about(self) -> dict[str, str]:
        return {"model": "LogisticRegression on scikit-learn's 8x8 digits", "post": "/predict"}


deployment_graph = DigitsAPI.bind(Classifier.bind())


if __name__ == "__main__":
    serve.run(deployment_graph, route_prefix="/")
    print("serving on http://127.0.0.1:8000 — try: python examples/quickstart_client.py")
    print("Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
