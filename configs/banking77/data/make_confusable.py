"""Write confusable.yaml: each banking77 intent -> the other intent its training queries look most like.

    python configs/banking77/data/make_confusable.py

The most similar other intent by the cosine of TF-IDF centroids (word 1-2 grams over train.csv): the
wrong answer a classifier is most likely to give, used as the non-preferred answer of the DPO pairs
(build_dpo.yaml). Deterministic; the output is committed beside this script.
"""

from __future__ import annotations

import csv
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    with (HERE / "train.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = sorted({r["category"] for r in rows})
    X = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit_transform(r["text"] for r in rows)
    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index[r["category"]] for r in rows])
    centroids = np.vstack([np.asarray(X[y == i].mean(axis=0)) for i in range(len(labels))])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    sim = centroids @ centroids.T
    np.fill_diagonal(sim, -1)
    lines = ["# python configs/banking77/data/make_confusable.py: each intent -> the intent its queries look most",
             "# like (cosine of TF-IDF centroids over train.csv), the non-preferred answer of build_dpo.yaml's pairs"]
    lines += [f"{label}: {labels[int(sim[i].argmax())]}" for i, label in enumerate(labels)]
    (HERE / "confusable.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {HERE / 'confusable.yaml'} ({len(labels)} intents)")


if __name__ == "__main__":
    main()
