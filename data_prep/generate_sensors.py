"""Seeded generator of industrial sensor readings labelled with a recommended action.

This supports the "sensor readings -> recommended action" use case. Each row
is one reading from one machine. The ``action`` label is computed from that
row's readings by fixed, deterministic rules, so a model fine-tuned on the data
has a learnable target and every label can be checked.

Regenerate the shipped data set (from the repository root)::

    python -m data_prep.generate_sensors --rows 600 --seed 7 --out configs/sensors/data/sensor_readings.csv

Columns::

    reading_id,timestamp,machine_id,temperature_c,vibration_mm_s,pressure_bar,rpm,action

Action rules
------------
The rules are applied in this order and the first one that matches wins. The
more severe conditions come first.

1. ``emergency_shutdown``   -- ``temperature_c > 95`` **and** ``vibration_mm_s > 12``
2. ``inspect_bearing``      -- ``vibration_mm_s > 7``
3. ``reduce_load``          -- ``pressure_bar < 2`` **or** ``pressure_bar > 8``
   **or** ``temperature_c > 95`` (overheating without severe vibration)
4. ``schedule_maintenance`` -- ``temperature_c >= 80`` (80-95 degC, running warm)
5. ``no_action``            -- everything else

``rpm`` is informational only and never affects the label. The rules use the
values exactly as written to the CSV (temperature and vibration rounded to 1
decimal place, pressure to 2), so each label can be recomputed from the file
itself. :func:`action_for` implements the rules.

Mix
---
About 70% of the rows are normal readings (``no_action``). The other rows are
anomalies split evenly across the four other kinds. Reduce-load anomalies are
a mix of low pressure, high pressure and overheating. The exact counts come
from the row count, and the seed decides which row is which, so the same
``--rows``/``--seed`` always produces a byte-identical file.

Only the standard library is used (``random.Random(seed)`` and ``csv``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import random
from pathlib import Path
from typing import Sequence

COLUMNS = [
    "reading_id",
    "timestamp",
    "machine_id",
    "temperature_c",
    "vibration_mm_s",
    "pressure_bar",
    "rpm",
    "action",
]

ACTIONS = (
    "no_action",
    "schedule_maintenance",
    "reduce_load",
    "inspect_bearing",
    "emergency_shutdown",
)

NORMAL_FRACTION = 0.70
MACHINES = [f"M-{i:02d}" for i in range(1, 9)]
START = _dt.datetime(2024, 3, 1, 0, 0, 0)
INTERVAL_S = 60


def action_for(temperature_c: float, vibration_mm_s: float, pressure_bar: float) -> str:
    """Return the recommended action for one reading (see module docstring)."""
    if temperature_c > 95 and vibration_mm_s > 12:
        return "emergency_shutdown"
    if vibration_mm_s > 7:
        return "inspect_bearing"
    if pressure_bar < 2 or pressure_bar > 8 or temperature_c > 95:
        return "reduce_load"
    if temperature_c >= 80:
        return "schedule_maintenance"
    return "no_action"


def _kinds(rows: int, rng: random.Random) -> list[str]:
    """Exact label mix for ``rows`` rows, shuffled with ``rng``."""
    n_normal = round(rows * NORMAL_FRACTION)
    anomalies = ACTIONS[1:]
    n_anom = rows - n_normal
    kinds = ["no_action"] * n_normal
    for i, kind in enumerate(anomalies):
        kinds += [kind] * (n_anom // len(anomalies) + (1 if i < n_anom % len(anomalies) else 0))
    rng.shuffle(kinds)
    return kinds


def _reading(kind: str, rng: random.Random) -> tuple[float, float, float, int]:
    """Sample (temperature, vibration, pressure, rpm) values meant to fall under ``kind``.

    The value ranges stay away from the rule thresholds. The label is still
    recomputed with :func:`action_for`, so the rules decide in the end.
    """
    temp = rng.uniform(55.0, 75.0)
    vib = rng.uniform(1.0, 5.5)
    pres = rng.uniform(3.0, 7.0)
    rpm = rng.randint(1420, 1580)
    if kind == "schedule_maintenance":
        temp = rng.uniform(81.0, 94.0)
    elif kind == "reduce_load":
        sub = rng.random()
        if sub < 0.4:
            pres = rng.uniform(0.8, 1.8)
            rpm = rng.randint(1300, 1450)
        elif sub < 0.8:
            pres = rng.uniform(8.3, 10.5)
            rpm = rng.randint(1550, 1700)
        else:
            temp = rng.uniform(96.0, 105.0)
            rpm = rng.randint(1600, 1750)
    elif kind == "inspect_bearing":
        vib = rng.uniform(7.5, 11.5)
        temp = rng.uniform(55.0, 90.0)
    elif kind == "emergency_shutdown":
        temp = rng.uniform(96.5, 112.0)
        vib = rng.uniform(12.5, 18.0)
        pres = rng.uniform(2.5, 9.0)
        rpm = rng.randint(1500, 1800)
    return round(temp, 1), round(vib, 1), round(pres, 2), rpm


def generate(rows: int, seed: int) -> list[dict]:
    """Generate ``rows`` labelled readings. Calling it again with the same ``seed`` gives the same rows."""
    if rows < 0:
        raise ValueError("rows must be >= 0")
    rng = random.Random(seed)
    out: list[dict] = []
    for i, kind in enumerate(_kinds(rows, rng)):
        temp, vib, pres, rpm = _reading(kind, rng)
        ts = START + _dt.timedelta(seconds=i * INTERVAL_S + rng.randint(0, INTERVAL_S - 1))
        out.append(
            {
                "reading_id": f"R{i + 1:06d}",
                "timestamp": ts.strftime("%Y-%m-%d %H:%M:%S"),
                "machine_id": rng.choice(MACHINES),
                "temperature_c": f"{temp:.1f}",
                "vibration_mm_s": f"{vib:.1f}",
                "pressure_bar": f"{pres:.2f}",
                "rpm": str(rpm),
                "action": action_for(temp, vib, pres),
            }
        )
    return out


def write_csv(rows: list[dict], path: str | Path) -> None:
    """Write ``rows`` to ``path`` as CSV with ``\\n`` line endings, creating parent folders as needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.generate_sensors",
        description="Generate seeded industrial sensor readings labelled with a recommended action.",
    )
    parser.add_argument("--rows", type=int, default=600, help="number of readings to generate (default: 600)")
    parser.add_argument("--seed", type=int, default=7, help="random seed (default: 7)")
    parser.add_argument(
        "--out",
        default="configs/sensors/data/sensor_readings.csv",
        help="output CSV path (default: configs/sensors/data/sensor_readings.csv)",
    )
    args = parser.parse_args(argv)
    if args.rows < 0:
        parser.error("--rows must be >= 0")
    rows = generate(args.rows, args.seed)
    write_csv(rows, args.out)
    counts = {a: sum(r["action"] == a for r in rows) for a in ACTIONS}
    print(f"wrote {len(rows)} rows to {args.out}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
