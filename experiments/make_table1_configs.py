#!/usr/bin/env python
"""Write configs/table1/<dataset>_<network>_lambda<lambda>.yaml, one per setting of the paper's Table 1.

Optimiser settings are the paper's (Adam, learning rate 1e-4, batch 128, supplement 5.2); the step budget is
reduced to fit a 2-core CPU (the paper: 18,750 steps = 400 epochs). Rerun after changing the budget below.
"""

from pathlib import Path

import yaml

NETWORKS = ("mlp", "encdec", "unet", "convonly")
LAMBDAS = (64, 128, 256, 512, 1024, 2048)
BUDGET = {  # steps at batch 128 that fit a CPU; paper: 18,750
    "mnist": {"steps": 1000, "image_size": 28},
    "triangles": {"steps": 300, "image_size": 128},
}


def main() -> None:
    out = Path(__file__).resolve().parents[1] / "configs" / "table1"
    out.mkdir(parents=True, exist_ok=True)
    for dataset, budget in BUDGET.items():
        for network in NETWORKS:
            for lmbda in LAMBDAS:
                config = {
                    "dataset": dataset,
                    "network": network,
                    "lmbda": lmbda,
                    "similarity": "mse",
                    "image_size": budget["image_size"],
                    "optimizer": "adam",
                    "lr": 1e-4,
                    "batch_size": 128,
                    "steps": budget["steps"],
                    "paper_steps": 18750,
                    "test_pairs": 512,
                    "seed": 0,
                }
                path = out / f"{dataset}_{network}_lambda{lmbda}.yaml"
                path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"wrote {len(BUDGET) * len(NETWORKS) * len(LAMBDAS)} configs to {out}")


if __name__ == "__main__":
    main()
