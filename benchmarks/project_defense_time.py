"""Project the wall time of `run_defenses.py --scale gpu|gpu_full` on an H100 from the study's measured H100 stages
(safety_units.experiments.benchmarks.time_projection: the cost model).

    python benchmarks/project_defense_time.py                  # the gpu scale
    python benchmarks/project_defense_time.py --scale gpu_full
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from safety_units.experiments.benchmarks.time_projection import project_defenses, projection_cli  # noqa: E402
from safety_units.experiments.defense_bench.plan import SCALES  # noqa: E402
from safety_units.utils.errors import friendly_errors  # noqa: E402


@friendly_errors
def main(argv: list[str] | None = None) -> str:
    return projection_cli(__doc__, SCALES, project_defenses, ROOT / "results" / "ssah_smollm2", argv)


if __name__ == "__main__":
    main()
