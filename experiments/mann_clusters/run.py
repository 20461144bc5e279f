"""MANN's read attention on 5-way 1-shot hidden clusters: the paper's, with NTM's key strength, and
with the key strength and an add vector (issue #17; models/mann.py says why).

    .venv/bin/python experiments/mann_clusters/run.py [--seeds 0 1 2]

The paper's sizes (200 LSTM units, 128 slots of width 40, 4 read heads), 1,000 iterations of 16 tasks
at Adam 1e-3, on the synthetic clusters of tests/clusters.py (class centres in 2 of 12 dimensions,
the others noise of sd 0.3): held-out accuracy over 600 tasks, chance 0.2. Finished runs are reused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bayesmeta.experiment import product, run_grid, script

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))  # the clusters family is tests.clusters, by import path
ROWS = {
    "plain cosine read (the paper)": (),
    "key strength (started at 10)": ("model.params.key_strength=true",),
    "key strength and add vector": ("model.params.key_strength=true", "model.params.add_vector=true"),
}
NOTES = """
MANN (LSTM controller of 200 units, 128 x 40 memory, 4 read heads, LRU access, gamma 0.95) on 5-way
1-shot episodes of hidden clusters (tests/clusters.py: class centres ~ N(0, 1.5^2) in 2 of 12 input
dimensions, examples at sd 0.3 around them, the other 10 dimensions noise of sd 0.3; a 16-unit ReLU
layer embeds them), 3 queries per class, 1,000 iterations of meta-batch 16 at Adam 1e-3; held-out
accuracy over 600 tasks (chance 0.2). The paper's read weights are a softmax over cosines in [-1, 1]
across 128 slots, most of them empty; the key strength multiplies them by beta_t = 1 + softplus(W h_t
+ b), beta = 10 at initialisation (NTM, Graves et al. 2014), and the add vector writes
tanh(W_v h_t + b_v) instead of the key. The Omniglot row `MANN 5-way, key strength` uses both.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    run_grid(
        "MANN on 5-way 1-shot hidden clusters: the read attention",
        HERE / "base.toml",
        product(ROWS, {"5-way 1-shot": ()}, args.seeds),
        ["accuracy@1", "nll@1"],
        HERE,
        notes=NOTES,
        progress=False,
    )


if __name__ == "__main__":
    script(main)
