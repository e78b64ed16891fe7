"""The reliability cases' table: each fault-injection test records a row; RELIABILITY.md is written
from the rows at the end of the session (tests/conftest.py)."""
from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass, field

COLUMNS = ("Case", "Fault or input", "Injected", "What happened", "Images lost", "Duplicates", "Test")

INTRO = """# Reliability

What the engine does under faults and bad input, measured by the tests that inject them for real:
`kill -9` of the driver process at several points and of labeler actors and host-task workers; a
fault-injecting HTTP proxy in front of the S3 server (HTTP 500, 503 SlowDown, dropped connections for a
fraction of requests, outages of N seconds); two runs started together into one output; a corpus of
bad inputs. Every case runs a real job on a local Ray cluster with the weight-free `classical_*`
labelers (plus test labelers in `tests/recording_labelers.py` that log their calls and process ids, or
take a set time per image, so a process can be killed at a chosen point) and counts, from the labels
it wrote, the images lost (good inputs with no `ok` row at the end) and the duplicates (rows beyond one
per image id).

This file is written by the tests themselves: `python -m pytest -m reliability` (the full suite runs
the same cases). The last column is the test's outcome: `xfail` marks a case whose protection is not
in the engine yet (the row then shows what happens today).
"""


def _cell(value) -> str:
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


@dataclass
class Row:
    case: str
    fault: str
    injected: str
    outcome: str
    lost: int | str
    duplicates: int | str
    nodeid: str = ""


@dataclass
class ReliabilityLog:
    """Session-wide collector of rows; ``outcomes`` maps a test's node id to passed/failed/xfail/..."""

    rows: list[Row] = field(default_factory=list)
    outcomes: dict[str, str] = field(default_factory=dict)
    current: str = ""  # node id of the test that is running (set by the conftest hook)

    def add(self, case: str, fault: str, injected, outcome: str, lost, duplicates) -> None:
        self.rows.append(Row(case, fault, str(injected), outcome, lost, duplicates, self.current))

    def markdown(self) -> str:
        lines = [INTRO,
                 f"Last written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on "
                 f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
                 f"{platform.python_version()}.\n",
                 "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for r in self.rows:
            test = self.outcomes.get(r.nodeid, "?")
            lines.append("| " + " | ".join(_cell(v) for v in (r.case, r.fault, r.injected, r.outcome, r.lost,
                                                                 r.duplicates, test)) + " |")
        return "\n".join(lines) + "\n"

    def write(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.markdown())
