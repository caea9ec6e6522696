"""Speed and recall of irisseg.retrieval.CaseIndex: exact (IndexFlatIP) against IVF-PQ (prints a table).

Builds both kinds over N seeded unit vectors of dimension D, then runs Q single-vector searches (k = 10)
one at a time (median and 90th percentile latency) and once as one batch (ms per query), and measures
recall@10 of each index against exact brute force on the Q queries (fresh vectors, not in the index).
"random" data (i.i.d. Gaussian directions) is the hardest case for quantization: no neighbour is much
nearer than any other; "clustered" data (points around 1000 centres) is closer to real embeddings.

    python benchmarks/index_search.py [--n 100000] [--dim 1024] [--queries 200] [--data random|clustered]
                                      [--nprobe 8,32,128] [--threads 2] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import faiss
import numpy as np

from irisseg.retrieval import CaseIndex


def unit_rows(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a / np.linalg.norm(a, axis=1, keepdims=True), dtype=np.float32)


def make_data(kind: str, n: int, dim: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return (unit_rows(rng.standard_normal((n, dim), dtype=np.float32)),
                unit_rows(rng.standard_normal((n_queries, dim), dtype=np.float32)))
    centres = unit_rows(rng.standard_normal((1000, dim), dtype=np.float32))
    spread = 1.0 / np.sqrt(dim)  # noise of about the centre's norm: neighbours share a centre, not much more

    def around(m: int) -> np.ndarray:
        return unit_rows(centres[rng.integers(0, len(centres), m)]
                         + spread * rng.standard_normal((m, dim), dtype=np.float32))

    return around(n), around(n_queries)


def latency(index: CaseIndex, queries: np.ndarray, k: int, clock) -> tuple[float, float, float]:
    """(median ms, p90 ms) of single-vector searches, and ms per query of one batched search."""
    index.search(queries[:1], k)  # warm-up
    times = []
    for q in queries:
        t0 = clock()
        index.search(q[None], k)
        times.append((clock() - t0) * 1000)
    t0 = clock()
    index.search(queries, k)
    batched = (clock() - t0) * 1000 / len(queries)
    return statistics.median(times), float(np.percentile(times, 90)), batched


def recall(index: CaseIndex, queries: np.ndarray, truth: np.ndarray, k: int) -> float:
    found = index.search(queries, k)
    return float(np.mean([len({int(h.case_id) for h in hits} & set(t.tolist())) / k
                          for hits, t in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="indexed vectors")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--data", choices=("random", "clustered"), default="random")
    parser.add_argument("--nprobe", default="", help="comma-separated nprobe values for extra IVF-PQ rows")
    parser.add_argument("--threads", type=int, default=None, help="FAISS threads (default: FAISS's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (use with --threads 1 on a busy "
                             "machine, where wall times measure the other load)")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    k = args.k
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    t0 = time.perf_counter()
    base, queries = make_data(args.data, args.n, args.dim, args.queries, args.seed)
    print(f"{args.n} {args.data} unit vectors, dim {args.dim}, {args.queries} queries, k={k}, "
          f"FAISS threads {faiss.omp_get_max_threads()}, {args.clock} clock, data {time.perf_counter() - t0:.1f} s")
    _, truth = faiss.knn(queries, base, k, metric=faiss.METRIC_INNER_PRODUCT)
    ids = [str(i) for i in range(args.n)]
    paths = [f"/data/case_{i}.nii.gz" for i in range(args.n)]
    labels = np.zeros((args.n, 1), np.uint8)

    rows = []
    for approximate in (False, True):
        index = CaseIndex(args.dim, ["finding"], approximate=approximate)
        t0 = clock()
        index.add(base, ids, paths, labels)  # IVF-PQ: trains, adds, measures recall on 1000 own vectors
        build = clock() - t0
        settings = [None]
        if approximate:
            settings += [int(v) for v in args.nprobe.split(",") if v.strip()]
        default_nprobe = index.nprobe
        for nprobe in settings:
            if nprobe is not None:
                index.nprobe = nprobe
            name = "exact" if not approximate else f"ivfpq nlist={index.nlist} m={index.m} nprobe={index.nprobe}"
            med, p90, batched = latency(index, queries, k, clock)
            rows.append((name, build if nprobe is None else float("nan"), med, p90, batched,
                         recall(index, queries, truth, k), index.recall_at_10 if nprobe is None else None))
        if approximate:
            index.nprobe = default_nprobe
        del index

    print(f"{'index':<36}{'build s':>9}{'median ms':>11}{'p90 ms':>9}{'batch ms/q':>12}{'recall@10':>11}"
          f"{'stored':>8}")
    for name, build, med, p90, batched, rec, stored in rows:
        build_s = "" if build != build else f"{build:.1f}"
        stored_s = "" if stored is None else f"{stored:.3f}"
        print(f"{name:<36}{build_s:>9}{med:>11.2f}{p90:>9.2f}{batched:>12.3f}{rec:>11.3f}{stored_s:>8}")
    print("recall@10: on the queries, against exact brute force; stored: the index's own measurement "
          "(1000 of its vectors as queries, kept in meta.json). IVF-PQ build includes that measurement.")


if __name__ == "__main__":
    main()
