"""Project the wall time of `run_study.py --scale <scale>` from stages measured on the same kind of machine
(safety_units.experiments.benchmarks.time_projection: the cost model and its two bounds).

    python benchmarks/project_study_time.py                       # the gpu plan, from results/ssah_smollm2
    python benchmarks/project_study_time.py --workers 1
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

from safety_units.experiments.benchmarks.time_projection import project_study, projection_cli  # noqa: E402
from safety_units.experiments.study.plan import SCALES  # noqa: E402
from safety_units.utils.errors import friendly_errors  # noqa: E402


@friendly_errors
def main(argv: list[str] | None = None) -> str:
    return projection_cli(__doc__, SCALES, project_study, ROOT / "results" / "ssah_smollm2", argv)


if __name__ == "__main__":
    main()
