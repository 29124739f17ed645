"""`finetune search`: the k nearest gallery images of each query, from `finetune predict` outputs.

    finetune predict --config configs/faces.yaml --ckpt_path best.ckpt --data.predict_root gallery/ \
        --predictions.output_dir runs/faces/gallery
    finetune predict ... --data.predict_root queries/ --predictions.output_dir runs/faces/queries
    finetune search --gallery runs/faces/gallery --queries runs/faces/queries --k 5
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def read_embeddings(folder: Path) -> tuple[np.ndarray, list[dict]]:
    if not (folder / "embeddings.npy").is_file():
        raise SystemExit(f"{folder}: no embeddings.npy; write it with `finetune predict` first")
    with (folder / "embeddings.csv").open() as f:
        rows = list(csv.DictReader(f))
    return np.load(folder / "embeddings.npy"), rows


def search(gallery: Path, queries: Path, k: int = 5) -> list[dict]:
    import faiss

    index = faiss.read_index(str(gallery / "index.faiss"))
    _, gallery_rows = read_embeddings(gallery)
    query_vectors, query_rows = read_embeddings(queries)
    scores, neighbours = index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), min(k, index.ntotal))
    results = []
    for query, row_scores, row_neighbours in zip(query_rows, scores, neighbours):
        for rank, (score, n) in enumerate(zip(row_scores, row_neighbours), start=1):
            match = gallery_rows[n]
            results.append({"query": query["path"], "rank": rank, "match": match["path"],
                            "identity": match["identity"], "similarity": f"{score:.4f}"})
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="finetune search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=Path, required=True, help="folder with embeddings.npy/.csv and index.faiss")
    parser.add_argument("--queries", type=Path, required=True, help="folder with the queries' embeddings.npy/.csv")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--output", type=Path, default=None, help="CSV to write (default: print)")
    args = parser.parse_args(argv)
    results = search(args.gallery, args.queries, args.k)
    columns = ["query", "rank", "match", "identity", "similarity"]
    if args.output:
        with args.output.open("w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(results)
        print(f"{len(results)} matches written to {args.output}")
    else:
        for r in results:
            print(",".join(str(r[c]) for c in columns))
