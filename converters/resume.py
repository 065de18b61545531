"""What an interrupted conversion leaves to go on from: ``rbe convert ... --resume``.

A calibrated conversion of a large model runs for hours; a signal, a crash or
a power cut must not cost it all.  Beside the output, in the folder
``.NAME.resume``, the conversion keeps:

* ``key.json``: what the state belongs to: rbe's version, the options, and each
  input file's name, size and modification time (``fingerprint``).  A resume
  with any of them different is refused (exit 2).
* ``statistics.json`` and ``kept-N.npy``: the survey's results (mixed precision's
  scores, head scores, the Hessians of the weights outside the blocks), so a
  resume never surveys again.
* ``survey.json`` and ``survey-hidden-N.npy``: while the survey runs, after each
  block surveyed, the scores so far and the hidden states the next block reads,
  so a conversion stopped during the survey goes on from its last block.
* ``partial.json``: the name of the partial file this run writes, so that one a
  run killed before its first checkpoint began is removed, not left behind.
* ``block.json`` and ``hidden-N.npy``: after each block encoded, the writer's
  checkpoint (``Writer.checkpoint``: its partial file's name and length and the
  entries so far) and the hidden states the next block reads.

Every file is replaced atomically, the block's hidden states before the JSON
that names them; arrays are read back with ``allow_pickle=False``.  The
output itself stays atomic: until the last step nothing is at its path, and
the state is removed once the output is in place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np

from rbeformat import InputError, UsageError, __version__
from rbeformat.codecs.core.tensor import Calibration

STATE_VERSION = 1


def state_dir(output: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(output)), f".{os.path.basename(output)}.resume")


def fingerprint(options: dict, files: dict[str, str]) -> dict:
    """What a resume must find unchanged: the version, the options and each input file's size and
    modification time (``files``: {name as the input lists it: its path})."""
    stats = []
    for name, path in sorted(files.items()):
        info = os.stat(path)
        stats.append([name, info.st_size, info.st_mtime_ns])
    return {"state": STATE_VERSION, "rbe": __version__, "options": options, "files": stats}


class ResumeState:
    """The state folder of one output (``state_dir``) for a conversion with key ``key`` (``fingerprint``)."""

    def __init__(self, output: str, key: dict):
        self.output = output
        self.folder = state_dir(output)
        self.key = key

    # -- starting ----------------------------------------------------------------------
    def start(self, resume: bool) -> bool:
        """Prepares the folder; returns whether there is progress to resume.  With ``resume``, a state
        of another input or other options is refused (UsageError); without it, any state is cleared."""
        if os.path.islink(self.folder):
            raise InputError(f"{self.folder}: is a symbolic link; rbe keeps its resume state in a folder of its own")
        found = self._read("key.json") if os.path.isdir(self.folder) else None
        if not resume or found is None:
            self.clear()
            os.makedirs(self.folder)
            self._write_json("key.json", self.key)
            return False
        if found != self.key:
            raise UsageError(
                f"{self.output}: --resume: the interrupted conversion had {_difference(found, self.key)}; "
                "run without --resume to start again"
            )
        return os.path.exists(os.path.join(self.folder, "statistics.json"))

    def clear(self) -> None:
        """Removes the state and the partial files it names (its last checkpoint's, this run's)."""
        if not os.path.isdir(self.folder) or os.path.islink(self.folder):
            return
        self._remove_partial(self._checkpoint_partial())
        self._remove_partial(self._noted_partial())
        shutil.rmtree(self.folder)

    def own_partial(self, name: str) -> None:
        """Notes the partial file this run writes (``partial.json``).  One an earlier run began and never
        checkpointed (killed before its first block was written) is removed: nothing resumes it."""
        earlier = self._noted_partial()
        if earlier != name:
            self._remove_partial(earlier)
        self._write_json("partial.json", {"partial": name})

    def _checkpoint_partial(self) -> str | None:
        """The partial file the last block's checkpoint names (``block.json``), as written there."""
        block = self._read("block.json")
        return block.get("writer", {}).get("partial") if isinstance(block, dict) else None

    def _noted_partial(self) -> str | None:
        noted = self._read("partial.json")
        return noted.get("partial") if isinstance(noted, dict) else None

    def _remove_partial(self, partial) -> None:
        """Removes a partial file of this output (a hidden name beside it, a plain file; nothing else)."""
        path = self._partial_path(partial)
        if path is not None:
            os.unlink(path)

    def _partial_path(self, partial) -> str | None:
        """The path of a partial file of this output that exists (a hidden name beside it, a plain file),
        else None."""
        prefix = f".{os.path.basename(self.output)}."
        if not (isinstance(partial, str) and partial.startswith(prefix) and partial.endswith(".partial")):
            return None
        if "/" in partial or "\0" in partial:
            return None
        path = os.path.join(os.path.dirname(self.folder), partial)
        return path if os.path.isfile(path) and not os.path.islink(path) else None

    # -- the survey's results -----------------------------------------------------------
    def save_statistics(self, stats) -> None:
        kept = sorted(stats.kept)
        for index, name in enumerate(kept):
            self._write_array(f"kept-{index}.npy", stats.kept[name].hessian)
        self._write_json(
            "statistics.json",
            {
                "methods": stats.methods,
                "kept": [[name, stats.kept[name].method] for name in kept],
                "candidates": {name: dataclasses.asdict(c) for name, c in stats.candidates.items()},
                "head_scores": {str(layer): np.asarray(s).tolist() for layer, s in stats.head_scores.items()},
            },
        )

    def load_statistics(self):
        from .compress.mixed import Candidate
        from .compress.plan import Statistics

        data = self._read("statistics.json")
        if not isinstance(data, dict):
            raise InputError(f"{self.folder}: statistics.json is damaged; run without --resume")
        kept = {
            name: Calibration(method, self._read_array(f"kept-{index}.npy"))
            for index, (name, method) in enumerate(data["kept"])
        }
        candidates = {
            name: Candidate(c["name"], c["weights"], tuple(c["bits"]), tuple(c["errors"]))
            for name, c in data["candidates"].items()
        }
        head_scores = {int(layer): np.asarray(s) for layer, s in data["head_scores"].items()}
        return Statistics(dict(data["methods"]), kept, candidates, head_scores)

    def exists(self) -> bool:
        """Whether an earlier run left the folder (a link in its place is refused by ``start``)."""
        return os.path.isdir(self.folder) and not os.path.islink(self.folder)

    def has_progress(self) -> bool:
        """Whether ``--resume`` would skip work: a survey begun, its results kept or a block encoded."""
        done = ("survey.json", "statistics.json", "block.json")
        return any(os.path.isfile(os.path.join(self.folder, name)) for name in done)

    def shown(self) -> str:
        """The folder, and the partial file of the blocks encoded so far beside it when there is one, as a
        message names them: relative to the working directory when below it."""
        partial = self._partial_path(self._checkpoint_partial())
        return " and ".join(_shown(path) for path in [self.folder] + ([partial] if partial else []))

    def survey_started(self) -> bool:
        return os.path.isfile(os.path.join(self.folder, "survey.json"))

    def save_survey(self, index: int, stats, hidden: list[np.ndarray]) -> None:
        """After block ``index`` is surveyed: the scores so far and the next block's hidden states."""
        for k, array in enumerate(hidden):
            self._write_array(f"survey-hidden-{index % 2}-{k}.npy", array)  # the last good set survives
        self._write_json(
            "survey.json",
            {
                "block": index,
                "hidden": len(hidden),
                "candidates": {name: dataclasses.asdict(c) for name, c in stats.candidates.items()},
                "head_scores": {str(layer): np.asarray(s).tolist() for layer, s in stats.head_scores.items()},
            },
        )

    def load_survey(self) -> tuple[int, dict, dict, list[np.ndarray]] | None:
        """(last block surveyed, its candidates, head scores, the next block's hidden states), or None."""
        from .compress.mixed import Candidate

        data = self._read("survey.json")
        if data is None:
            return None
        try:
            index = int(data["block"])
            candidates = {
                name: Candidate(c["name"], c["weights"], tuple(c["bits"]), tuple(c["errors"]))
                for name, c in data["candidates"].items()
            }
            head_scores = {int(layer): np.asarray(s) for layer, s in data["head_scores"].items()}
            count = int(data["hidden"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise InputError(f"{self.folder}: survey.json is damaged; run without --resume") from None
        hidden = [self._read_array(f"survey-hidden-{index % 2}-{k}.npy") for k in range(count)]
        return index, candidates, head_scores, hidden

    # -- blocks --------------------------------------------------------------------------
    def save_block(self, index: int, writer_state: dict, hidden: list[np.ndarray]) -> None:
        """After block ``index`` is written: the writer's checkpoint and the next block's hidden states."""
        for k, array in enumerate(hidden):
            self._write_array(f"hidden-{index % 2}-{k}.npy", array)  # two sets: the last good one survives
        self._write_json("block.json", {"block": index, "writer": writer_state, "hidden": len(hidden)})

    def load_block(self) -> tuple[int, dict, list[np.ndarray]] | None:
        """(last block written, the writer's checkpoint, the next block's hidden states), or None."""
        data = self._read("block.json")
        if data is None:
            return None
        index = data["block"]
        return index, data["writer"], [self._read_array(f"hidden-{index % 2}-{k}.npy") for k in range(data["hidden"])]

    # -- files ---------------------------------------------------------------------------
    def _read(self, name: str):
        path = os.path.join(self.folder, name)
        if not os.path.isfile(path) or os.path.islink(path):
            return None
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            raise InputError(f"{path}: damaged resume state; run without --resume to start again") from None

    def _read_array(self, name: str) -> np.ndarray:
        path = os.path.join(self.folder, name)
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: damaged resume state ({exc}); run without --resume to start again") from None

    def _write_json(self, name: str, obj) -> None:
        self._replace(name, json.dumps(obj, sort_keys=True).encode())

    def _write_array(self, name: str, array: np.ndarray) -> None:
        tmp = os.path.join(self.folder, f".{name}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, os.path.join(self.folder, name))

    def _replace(self, name: str, data: bytes) -> None:
        tmp = os.path.join(self.folder, f".{name}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, os.path.join(self.folder, name))


def _difference(found: dict, wanted: dict) -> str:
    for field in ("rbe", "options", "files", "state"):
        if found.get(field) != wanted.get(field):
            if field == "options":
                return "other options" + _options_named(found.get(field), wanted.get(field))
            return {"rbe": "another rbe version", "files": "other input files"}.get(field, "another state format")
    return "a different key"


def _options_named(found, wanted) -> str:
    """ " (threads: 2, not 1)" for the options that differ, when both are readable dicts."""
    if not isinstance(found, dict) or not isinstance(wanted, dict):
        return ""
    names = sorted(k for k in found.keys() | wanted.keys() if found.get(k) != wanted.get(k))
    shown = "; ".join(f"{k}: {found.get(k)!r}, not {wanted.get(k)!r}" for k in names[:3])
    return f" ({shown})" if shown else ""


def _shown(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative
