"""Finished results of a long run, kept as each finishes, so a killed run continues instead of restarting.

``make ablation`` trains and scores 33 students per family for over an hour; killed at minute 70 it
would otherwise start again from nothing. A ``Journal`` is one JSON line per finished result, appended
and flushed to disk as soon as the result exists. Every line carries the run's ``context`` (everything
its figures depend on: the teacher's files, the config, the rows, the threads); a journal written under
another context is refused, never mixed in. A line cut short by the kill (the only line that can be) is
left out and measured again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

__all__ = ["Journal"]

log = logging.getLogger("wand.journal")


class Journal:
    """``key -> result`` read from ``path`` (if there) and appended to it by ``add``."""

    def __init__(self, path: Path, context: dict):
        self.path = Path(path)
        self.context = json.loads(json.dumps(context))  # as it reads back: tuples become lists
        self.results: dict[str, dict] = {}
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        text = self.path.read_text()
        lines = text.split("\n")
        whole = lines[:-1]  # every line that was finished with its newline
        if lines[-1]:
            log.warning("%s: its last line was cut short (the run was killed while writing it); that result is "
                        "measured again", self.path)
        for number, line in enumerate(whole, 1):
            try:
                entry = json.loads(line)
                context, key, result = entry["context"], entry["key"], entry["result"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{self.path} line {number}: not a journal entry ({err}); delete the file to start "
                                 "over") from None
            if context != self.context:
                differ = sorted(k for k in {*context, *self.context} if context.get(k) != self.context.get(k))
                raise ValueError(f"{self.path} was written by another run (differs in {', '.join(differ)}): run the "
                                 "command that wrote it again to continue it, or delete it to start over")
            self.results[key] = result
        if lines[-1]:  # rewritten without the cut line, so the next entry starts on a line of its own
            partial = self.path.with_name(self.path.name + ".partial")
            partial.write_text("".join(line + "\n" for line in whole))
            os.replace(partial, self.path)

    def __contains__(self, key: str) -> bool:
        return key in self.results

    def __getitem__(self, key: str) -> dict:
        return self.results[key]

    def add(self, key: str, result: dict) -> None:
        """Appends ``result`` under ``key`` and flushes it to disk before returning."""
        line = json.dumps({"context": self.context, "key": key, "result": result}) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.results[key] = json.loads(line)["result"]

    def remove(self) -> None:
        """The run is whole: nothing left to continue."""
        self.path.unlink(missing_ok=True)
