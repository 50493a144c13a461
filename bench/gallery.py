"""Gallery search on synthetic clustered embeddings: exact (IndexFlatIP) against IVF (IndexIVFFlat), as
``mtlface-fast index`` builds them (mtlface_fast.scale.gallery).

The gallery: N unit vectors (D=512) around C identity centres (a face's embeddings cluster by identity),
``noise`` the spread of a face around its centre. The queries: Q new faces of gallery identities, drawn the
same way and never added. Reported per index: build time (IVF: k-means training + adding), queries/s for
the Q queries as one batch and 200 of them one at a time, recall@10 against exact search on those held-out queries, and
memory per face. IVF's nprobe is what ``index`` picks: the smallest power of two whose recall@10 against exact
search on up to 1000 gallery faces reaches the target.

    python bench/gallery.py                    # N=100,000, the committed result
    python bench/gallery.py --n 20000 --queries 500
"""
import argparse
import os
import time

import numpy as np

from common import environment, write_results  # noqa: E402  (bench/common.py puts the checkout on sys.path)


def clustered(n, d, groups, clusters, group_spread, noise, seed):
    """A sampler of unit-free vectors: ``groups`` broad groups (faces share traits beyond identity), ``clusters``
    identities around them (spread ``group_spread``), faces around their identity (spread ``noise``); spreads are
    the norm of the offset from a unit centre. Returns (n gallery faces, draw(count, seed) for new faces)."""
    rng = np.random.default_rng(seed)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    tops = unit(rng.standard_normal((groups, d)))
    centres = unit(tops[rng.integers(0, groups, clusters)]
                   + group_spread * rng.standard_normal((clusters, d)).astype(np.float32) / np.sqrt(d))

    def draw(count, s):
        r = np.random.default_rng(s)
        ids = r.integers(0, clusters, count)
        return (centres[ids] + noise * r.standard_normal((count, d)).astype(np.float32) / np.sqrt(d)).astype(
            np.float32)
    return draw(n, seed + 1), draw


def qps(index, q, k, single):
    start = time.perf_counter()
    if single:
        for row in q:
            index.search(row[None], k)
    else:
        index.search(q, k)
    return q.shape[0] / (time.perf_counter() - start)


def main():
    import faiss

    from mtlface_fast.scale import gallery as G
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--groups", type=int, default=512, help="broad groups of identities")
    p.add_argument("--clusters", type=int, default=10_000, help="identities")
    p.add_argument("--group-spread", type=float, default=1.0, help="spread of an identity around its group")
    p.add_argument("--noise", type=float, default=0.6, help="spread of a face around its identity")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--target-recall", type=float, default=G.TARGET_RECALL)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)

    x, draw = clustered(args.n, args.dim, args.groups, args.clusters, args.group_spread, args.noise, args.seed)
    xb = G.normalized(x)
    q = G.normalized(draw(args.queries, args.seed + 2))
    results = {}

    start = time.perf_counter()
    flat, meta_flat = G.make_index(xb, "flat")
    flat.add(xb)
    build_flat = time.perf_counter() - start
    _, exact = flat.search(q, args.k)
    results["flat"] = dict(meta_flat, build_s=round(build_flat, 3),
                           qps_batch=round(qps(flat, q, args.k, False), 1),
                           qps_single=round(qps(flat, q[:200], args.k, True), 1),
                           recall_at_10=1.0, bytes_per_face=G.bytes_per_face(meta_flat, args.dim))

    start = time.perf_counter()
    ivf, meta_ivf = G.make_index(xb, "ivf", seed=args.seed)
    train_s = time.perf_counter() - start
    ivf.add(xb)
    build_ivf = time.perf_counter() - start
    tune_start = time.perf_counter()
    tuned = G.tune_nprobe(ivf, xb, args.target_recall)
    tune_s = time.perf_counter() - tune_start
    _, approx = ivf.search(q, args.k)
    recall = G.recall_at_k(approx, exact, args.k)
    results["ivf"] = dict(meta_ivf, nprobe=tuned["nprobe"], tuning=tuned, train_s=round(train_s, 3),
                          build_s=round(build_ivf, 3), tune_s=round(tune_s, 3),
                          qps_batch=round(qps(ivf, q, args.k, False), 1),
                          qps_single=round(qps(ivf, q[:200], args.k, True), 1),
                          recall_at_10=round(recall, 5), bytes_per_face=G.bytes_per_face(meta_ivf, args.dim))
    sweep, chosen, nprobe = [], tuned["nprobe"], 1
    while nprobe <= ivf.nlist:  # recall of the held-out queries at each nprobe: how much margin the choice has
        ivf.nprobe = nprobe
        _, approx = ivf.search(q, args.k)
        sweep.append({"nprobe": nprobe, "recall_at_10": round(G.recall_at_k(approx, exact, args.k), 5),
                      "qps_batch": round(qps(ivf, q, args.k, False), 1)})
        nprobe *= 2
    ivf.nprobe = chosen
    results["ivf"]["heldout_sweep"] = sweep
    for name, r in results.items():
        print(f"{name:5s} build {r['build_s']:7.2f} s  {r['qps_batch']:9.1f} q/s batched  {r['qps_single']:8.1f} q/s "
              f"one by one  recall@10 {r['recall_at_10']:.4f}" + (f"  nprobe {r['nprobe']}/{r['nlist']}"
                                                                    if name == "ivf" else ""))
    env = environment("cpu")
    env["loadavg_1_5_15"] = [round(v, 2) for v in os.getloadavg()]  # the machine is shared
    env["faiss"] = faiss.__version__
    env["faiss_threads"] = str(args.threads)
    path = write_results(f"gallery-cpu-n{args.n}", {
        "benchmark": "gallery", "environment": env, "parameters": vars(args),
        "data": "synthetic, clustered: identities around broad groups, faces around identities (see clustered()); "
                "queries are new faces of gallery identities, never added",
        "results": [dict({"index": k}, **{f: v for f, v in r.items() if f not in ("tuning", "heldout_sweep")})
                    for k, r in results.items()],
        "ivf_tuning": results["ivf"]["tuning"], "ivf_heldout_sweep": results["ivf"]["heldout_sweep"],
        "memory_per_million_faces_gib": {k: round(r["bytes_per_face"] * 1e6 / 2 ** 30, 3) for k, r in results.items()},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
