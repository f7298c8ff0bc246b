"""Fine-tune a causal LM with Hydra + Lightning, optionally freezing safety units. See README.md."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from safety_units.utils.errors import friendly_errors  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@friendly_errors
def main(cfg: DictConfig) -> float | None:
    from safety_units.training.fit import optimized_metric, run_train

    return optimized_metric(cfg, run_train(cfg)["metrics"])  # for hydra sweepers (hparams_search=optuna)


if __name__ == "__main__":
    main()
