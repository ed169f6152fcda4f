"""Latency of `gatescope serve` under load: 20 concurrent loopback clients.

A real server (`python -m gatescope serve`, uvicorn) on the fixture model's atlas (stories260K
over TinyStories; skipped when ../shared/fixtures is absent). Each phase runs CLIENTS threads
with keep-alive connections, bounded by a request count and a time limit, and reports p50,
p99 and max latency:

* table: the HTML neuron table with filters, sorts and pages drawn at random;
* API: the JSON neuron table and cached neurons' JSON;
* cached page: HTML pages of neurons already computed;
* uncached page: every request a neuron never asked for before (each recomputes its texts;
  concurrent ones wait for each other: one recomputation at a time), and the same one
  client at a time (what a researcher clicking alone waits).

Requests say they accept gzip, as browsers do (neuron pages are sent precompressed).
Errors (non-200 answers, failed connections) are counted. Targets: cached page p99 < 200 ms,
uncached page < 1 s, zero errors.

    python benchmarks/serve_latency.py [--clients 20] [--tokens 100000]
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
ATLAS = "/atlas/atlas"
FILTERS = ("", "gate-_in- frequency > 0.2", "layer 1-3 and cos in-out < 0", "p99 gate+_in+ > 0.1")
SORTS = ("layer", "freq:gate-_in-", "max:gate+_in+", "cos:in_out")


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def report(self, target: str = "") -> str:
        if not self.latencies:
            return f"{self.name:24s} no requests  errors {len(self.errors)}"
        ms = sorted(x * 1000 for x in self.latencies)
        p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
        return (f"{self.name:24s} n={len(ms):4d}  p50 {statistics.median(ms):7.1f} ms  "
                f"p99 {p99:7.1f} ms  max {ms[-1]:7.1f} ms  errors {len(self.errors)}"
                + (f"   target {target}" if target else ""))  # fmt: skip


def build_atlas(root: Path, tokens: int) -> None:
    import gatescope
    from gatescope.corpus import build_corpus, save_corpus

    model, text = FIXTURES / "stories260K", FIXTURES / "tinystories" / "tinystories-2MiB.txt"
    corpus = build_corpus(text, model, max_length=256, tokens=tokens, seed=0, progress=False)
    save_corpus(corpus, root / "corpus")
    gatescope.scan(model, root / "corpus", out=root / "atlas", progress=False)


def start_server(atlas: Path) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "gatescope", "serve", str(atlas), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    assert server.stdout is not None
    for line in server.stdout:
        match = re.search(r"serving on http://127\.0\.0\.1:(\d+)/", line)
        if match:
            return server, int(match[1])
    raise SystemExit("the server did not start")


def run_phase(
    phase: Phase, port: int, paths: Callable[[int], list[str]], clients: int, limit_s: float
) -> None:
    """``clients`` threads, client ``i`` requesting ``paths(i)`` in order on one keep-alive
    connection, until done or ``limit_s`` seconds have passed."""
    deadline = time.monotonic() + limit_s
    lock = threading.Lock()

    def client(i: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for path in paths(i):
            if time.monotonic() > deadline:
                break
            start = time.perf_counter()
            try:
                connection.request("GET", path, headers={"Accept-Encoding": "gzip"})
                answer = connection.getresponse()
                answer.read()
                ok = answer.status == 200
                error = f"{answer.status} {path}"
            except (OSError, http.client.HTTPException) as failure:
                ok, error = False, f"{type(failure).__name__} {path}"
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            elapsed = time.perf_counter() - start
            with lock:
                (phase.latencies.append(elapsed) if ok else phase.errors.append(error))
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def table_path(rng: random.Random) -> str:
    from urllib.parse import urlencode

    query = {"filter": rng.choice(FILTERS), "sort": rng.choice(SORTS),
             "order": rng.choice(("asc", "desc")), "page": rng.randint(1, 3)}  # fmt: skip
    return f"{ATLAS}/?{urlencode(query)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=100_000, help="scanned for the atlas")
    parser.add_argument("--requests", type=int, default=20, help="per client and phase")
    parser.add_argument("--limit", type=float, default=120.0, help="seconds per phase")
    args = parser.parse_args()
    if not (FIXTURES / "stories260K" / "config.json").exists():
        print("skipped: ../shared/fixtures is absent")
        return
    import torch

    from gatescope.atlas import Atlas

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_atlas(root, args.tokens)
        atlas = Atlas.load(root / "atlas")
        layers, d = atlas.num_layers, atlas.d_mlp
        server, port = start_server(root / "atlas")
        try:
            print(f"stories260K atlas ({layers} x {d} neurons, {atlas.tokens:,} tokens); "
                  f"{args.clients} clients; {os.cpu_count()} CPUs, torch threads "
                  f"{torch.get_num_threads()}")  # fmt: skip
            neurons = [(layer, n) for layer in range(layers) for n in range(d)]
            random.Random(0).shuffle(neurons)
            warm = Phase("warm-up")
            start = time.perf_counter()
            run_phase(warm, port, lambda _: [f"{ATLAS}/"], 1, args.limit)
            table_s = time.perf_counter() - start
            cached = neurons[:20]
            run_phase(warm, port, lambda _: [f"{ATLAS}/neuron/{a}.{b}" for a, b in cached], 1,
                      10 * args.limit)  # fmt: skip
            print(f"first table (rows and weight figures) {table_s:.2f} s; "
                  f"warm-up errors {len(warm.errors)}")  # fmt: skip

            phases = []
            table = Phase("table")
            run_phase(table, port, lambda i: [table_path(random.Random(i * 1000 + j))
                                              for j in range(args.requests)],
                      args.clients, args.limit)  # fmt: skip
            phases.append((table, ""))
            api = Phase("JSON API")
            run_phase(api, port, lambda i: [
                f"/api{ATLAS}/neurons?sort=freq:gate-_in-&order=desc&page={j % 5 + 1}" if j % 2
                else "/api{}/neuron/{}.{}".format(ATLAS, *cached[(i + j) % len(cached)])
                for j in range(args.requests)
            ], args.clients, args.limit)  # fmt: skip
            phases.append((api, ""))
            page = Phase("cached page")
            run_phase(page, port, lambda i: [
                "{}/neuron/{}.{}".format(ATLAS, *cached[(i + j) % len(cached)])
                for j in range(args.requests)
            ], args.clients, args.limit)  # fmt: skip
            phases.append((page, "p99 < 200 ms"))
            fresh = iter(neurons[len(cached) :])
            alone = Phase("uncached page, 1 client")
            run_phase(alone, port, lambda _: ["{}/neuron/{}.{}".format(ATLAS, *next(fresh))
                                              for _ in range(10)], 1, args.limit)  # fmt: skip
            phases.append((alone, "< 1 s"))
            crowd = Phase(f"uncached page, {args.clients} clients")
            per_client = [[next(fresh) for _ in range(2)] for _ in range(args.clients)]
            run_phase(crowd, port, lambda i: ["{}/neuron/{}.{}".format(ATLAS, *n)
                                              for n in per_client[i]],
                      args.clients, 4 * args.limit)  # fmt: skip
            phases.append((crowd, ""))
            for phase, target in phases:
                print(phase.report(target))
            errors = [e for phase, _ in phases for e in phase.errors]
            print(f"errors: {len(errors)}" + (f" (first: {errors[0]})" if errors else ""))
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
