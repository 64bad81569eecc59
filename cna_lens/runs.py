"""Files that survive a crash: atomic writes (temp file in the same folder + ``os.replace``)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` onto ``path``; nothing half-written is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def jsonl(rows: Iterable[dict[str, Any]]) -> str:
    """Rows as JSON lines (UTF-8 text, one object per line)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike, kind: str, version: int | None = None) -> dict[str, Any]:
    """Read a JSON object written by cna_lens and check its ``kind`` (and ``format_version`` when
    ``version`` is given); clear errors otherwise. Every saved result is read through here."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a saved {kind})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); the file is corrupt") from e
    if not isinstance(data, dict) or data.get("kind") != kind:
        found = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} holds {found!r}, not a saved {kind}")
    if version is not None and data.get("format_version") != version:
        raise ValueError(
            f"{path}: format_version {data.get('format_version')!r}, but this cna_lens reads {kind} "
            f"format_version {version}; re-create the file with this version"
        )
    return data


#: Values of config fields that runs written before the field existed used implicitly.
LEGACY_DEFAULTS = {"process_weights": True, "choose_by": "first_token", "choose_tokens": 48, "trial_batch": 1}
#: How to resume with the stored setting, for fields that have a command-line switch.
_RESUME_HINTS = {
    "dtype": lambda v: f"resume it with --dtype {v} or ",
    "process_weights": lambda v: f"resume it with --{'' if v else 'no-'}process-weights or ",
    "trial_batch": lambda v: f"resume it with --trial-batch {v} or ",
}


def check_config(path: str | os.PathLike, config: dict[str, Any]) -> None:
    """Raise if ``path`` holds a run whose ``config.json`` differs from ``config`` (the field is named).

    Cheap: call it before loading a model, so a wrong ``--out`` fails at once."""
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return
    old = read_json(cfg, "cna_lens.RunConfig")
    old = {**{k: v for k, v in LEGACY_DEFAULTS.items() if k in config}, **old}
    for key in sorted(set(old) | set(config) | {"kind"}):
        if key in ("kind", "package_version"):
            continue
        if old.get(key) != config.get(key):
            hint = _RESUME_HINTS[key](old.get(key)) if key in _RESUME_HINTS else ""
            raise ValueError(
                f"{path} holds a run with {key}={old.get(key)!r}, not {config.get(key)!r}; "
                f"{hint}use another --out directory (runs with different settings are never mixed)"
            )


class RunDir:
    """A resumable run directory: ``config.json`` pins what the run is; ``completions.jsonl`` grows.

    Reopening a directory with a different config is refused (the differing field is named), so
    results of different models or settings are never mixed. A crash loses at most the rows that
    were being computed: finished rows are appended and fsynced as they come, and a torn last
    line is dropped on reopen.
    """

    def __init__(self, path: str | os.PathLike, config: dict[str, Any]):
        self.path = Path(path)
        check_config(self.path, config)
        self.path.mkdir(parents=True, exist_ok=True)
        cfg = self.path / "config.json"
        if not cfg.exists():
            atomic_write_json(cfg, {"kind": "cna_lens.RunConfig", **config})
        self.config = config
        self.jsonl = self.path / "completions.jsonl"
        self._rows = self._read_rows()

    def _read_rows(self) -> list[dict[str, Any]]:
        if not self.jsonl.exists():
            return []
        rows, good = [], 0
        raw = self.jsonl.read_bytes()
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # torn write: drop it
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good += len(line)
        if good != len(raw):
            with open(self.jsonl, "r+b") as f:
                f.truncate(good)
        return rows

    @staticmethod
    def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
        """The complete rows of a ``completions.jsonl`` (read only: a torn last line is skipped, not cut)."""
        rows = []
        for line in Path(path).read_bytes().splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return rows

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self._rows)

    def done(self) -> set[tuple[str, str, str]]:
        """Keys ``(dataset, condition, prompt_id)`` already computed."""
        return {(r["dataset"], r["condition"], r["prompt_id"]) for r in self._rows}

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings.json[stage]`` (summed over resumed runs)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            add_seconds(self.path / "timings.json", "cna_lens.Timings", stage, time.perf_counter() - t0)

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        data = jsonl(rows).encode("utf-8")
        with open(self.jsonl, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._rows.extend(rows)


def add_seconds(path: Path, kind: str, key: str, seconds: float) -> None:
    """Add ``seconds`` to ``path``'s ``seconds[key]`` (a JSON of ``kind``; summed over resumed runs)."""
    t = read_json(path, kind)["seconds"] if path.exists() else {}
    t[key] = t.get(key, 0.0) + seconds
    atomic_write_json(path, {"kind": kind, "seconds": t})


def append_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Append JSON lines and fsync; a torn last line (a write stopped mid-line) is cut first."""
    path = Path(path)
    if path.exists():
        data = path.read_bytes()
        good = data.rfind(b"\n") + 1
        if good != len(data):
            with open(path, "r+b") as f:
                f.truncate(good)
    with open(path, "ab") as f:
        f.write(jsonl(rows).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def exclusive(path: Path):
    """Hold an exclusive lock on ``path`` (released when the process ends, even by a crash): two
    processes resuming one search would mark each other's running trials as stale."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"{path.parent} is in use by another search process; wait for it or use another --out"
            ) from None
        yield
