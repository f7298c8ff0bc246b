"""Score every unit on safety vs utility data, classify ESU / EUU / CU / RU, write a unit map. See README.md."""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from safety_units.utils.errors import friendly_errors  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="attribute")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from safety_units.attribution.pipeline import run_attribution

    run_attribution(cfg)


if __name__ == "__main__":
    main()
