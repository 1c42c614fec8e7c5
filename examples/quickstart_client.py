"""Ask the quickstart's model about every held-out digit; print accuracy and latency.

    python examples/quickstart_client.py [--url http://127.0.0.1:8000] [--concurrency 16]

The images are the quarter of scikit-learn's digits the replicas did not train on
(`quickstart.digits_split`), sent as JSON bodies over HTTP, several at a time, so that the
classifier's `@serve.batch` has company to gather.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import httpx
from quickstart import digits_split


async def ask_all(url: str, images: list[list[float]], concurrency: int) -> list[tuple[int, float]]:
    """(predicted digit, seconds) for each image, in order."""
    results: list[tuple[int, float]] = [(-1, 0.0)] * len(images)
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def ask(i: int) -> None:
            async with gate:
                started = time.perf_counter()
                reply = await client.post("/predict", json={"pixels": images[i]})
                elapsed = time.perf_counter() - started
                reply.raise_for_status()
                results[i] = (reply.json()["digit"], elapsed)

        await asyncio.gather(*(ask(i) for i in range(len(images))))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    _, images, _, labels = digits_split()
    started = time.perf_counter()
    try:
        results = asyncio.run(ask_all(args.url, images.tolist(), args.concurrency))
    except httpx.HTTPError as exc:
        print(f"the quickstart did not answer at {args.url}: {exc!r}", file=sys.stderr)
        return 1
    wall = time.perf_counter() - started

    correct = sum(int(digit == label) for (digit, _), label in zip(results, labels, strict=True))
    latencies_ms = sorted(seconds * 1000 for _, seconds in results)
    cuts = statistics.quantiles(latencies_ms, n=100)
    print(
        f"{len(results)} requests, {args.concurrency} at a time, in {wall:.2f} s "
        f"({len(results) / wall:,.0f} req/s)"
    )
    print(f"accuracy: {correct}/{len(results)} = {correct / len(results):.1%}")
    print(f"latency: p50 {cuts[49]:.1f} ms  p90 {cuts[89]:.1f} ms  p99 {cuts[98]:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
