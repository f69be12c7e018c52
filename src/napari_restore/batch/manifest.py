"""The batch manifest: one CSV row per series, written as the run goes, safe against a kill.

``OUTPUT_ROOT/manifest.csv`` is what a person opens (any spreadsheet reads it). A single process
appends one row per finished series to it (one ``write`` + ``fsync`` per row); each rank of a
``torchrun`` run, and each ``--shard``, appends to its own ``OUTPUT_ROOT/manifest.parts/<tag>.csv``
instead, and the parts are merged into ``manifest.csv`` at the end. Every file is compacted at the
start and end of a run by writing a temporary sibling and renaming it into place, so a row torn by
a kill (a last line without its newline, or with the wrong number of fields) is dropped, never
glued to the next one. When the same series appears several times (a retry, a rerun, several
parts), the row finished last wins.
"""
from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..io.atomic import current_umask

from ..errors import OutputError

COLUMNS = ("input", "series_uid", "modality", "shape", "slices", "output", "model", "model_version", "seconds",
           "status", "error", "warnings", "read_s", "compute_s", "write_s", "finished", "worker", "id")
MANIFEST_NAME = "manifest.csv"
PARTS_DIR = "manifest.parts"
DONE, FAILED = "done", "failed"


def _clean(value) -> str:
    text = "" if value is None else str(value)
    return " | ".join(line.strip() for line in text.splitlines() if line.strip()) if "\n" in text or "\r" in text else text


def format_row(row: dict) -> str:
    """One CSV line (with its newline) holding ``row``'s values in :data:`COLUMNS` order."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([_clean(row.get(c, "")) for c in COLUMNS])
    return buf.getvalue()


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The complete rows of one manifest file (a torn last line or malformed row is left out)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise OutputError(f"cannot read the manifest ({exc})", path) from None
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # the last row was cut by a kill
    rows = []
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        return []
    if tuple(header) != COLUMNS:
        if "id" not in header or "status" not in header:
            raise OutputError("is not a napari-restore batch manifest (unexpected columns); move it away or choose "
                              "another output folder", path)
    for values in reader:
        if len(values) != len(header):
            continue
        row = dict(zip(header, values))
        if row.get("id") and row.get("status") in (DONE, FAILED):
            rows.append(row)
    return rows


def latest(rows: Iterable[dict]) -> dict[str, dict]:
    """``id -> row``: for each series the row finished last."""
    best: dict[str, dict] = {}
    for row in rows:
        old = best.get(row["id"])
        if old is None or row.get("finished", "") >= old.get("finished", ""):
            best[row["id"]] = row
    return best


def write_rows(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Replace ``path`` by a complete manifest holding ``rows`` (temporary sibling + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; the manifest is as readable as the outputs
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(",".join(COLUMNS) + "\n")
            for row in rows:
                fh.write(format_row(row))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _sort_key(row: dict) -> tuple:
    return (row.get("input", ""), row.get("output", ""), row.get("id", ""))


class Manifest:
    """The manifests under one output root, and the live file this process appends to.

    Args:
        output_root: the batch output folder.
        tag: ``None`` for a single process (appends to ``manifest.csv``), else a part name such as
            ``rank0-of-2`` or ``shard1-of-4`` (appends to ``manifest.parts/<tag>.csv``).
    """

    def __init__(self, output_root: str | os.PathLike, tag: str | None = None):
        self.root = Path(output_root)
        self.tag = tag
        self.main = self.root / MANIFEST_NAME
        self.live = self.main if tag is None else self.root / PARTS_DIR / f"{tag}.csv"
        self._lock = threading.Lock()
        self._fh = None

    # -- reading
    def part_files(self) -> list[Path]:
        parts = self.root / PARTS_DIR
        return sorted(parts.glob("*.csv")) if parts.is_dir() else []

    def state(self) -> dict[str, dict]:
        """``id -> latest row`` over ``manifest.csv`` and every part file."""
        rows = read_rows(self.main)
        for p in self.part_files():
            rows.extend(read_rows(p))
        return latest(rows)

    # -- writing
    def open(self) -> None:
        """Compact the live file (drop torn rows; a single process also folds in any parts), then append."""
        rows = read_rows(self.live)
        if self.tag is None:
            for p in self.part_files():
                rows.extend(read_rows(p))
        write_rows(self.live, sorted(latest(rows).values(), key=_sort_key))
        self._fh = open(self.live, "a", encoding="utf-8", newline="")

    def append(self, row: dict) -> None:
        """Commit one finished row: a single write, flushed and fsynced (thread-safe)."""
        line = format_row(row)
        with self._lock:
            if self._fh is None:
                raise RuntimeError("Manifest.open() was not called")
            self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
        if self.live.exists():
            write_rows(self.live, sorted(latest(read_rows(self.live)).values(), key=_sort_key))

    def merge(self, remove_parts: Iterable[Path] = ()) -> dict[str, dict]:
        """Fold every part into ``manifest.csv`` (under a file lock), then delete ``remove_parts``."""
        with _file_lock(self.root / ".manifest.lock"):
            state = self.state()
            write_rows(self.main, sorted(state.values(), key=_sort_key))
            for p in remove_parts:
                with contextlib.suppress(OSError):
                    Path(p).unlink()
            parts = self.root / PARTS_DIR
            with contextlib.suppress(OSError):
                parts.rmdir()  # only when empty
        return state


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock (Windows, some network file systems): best effort
            pass
        yield


__all__ = ["Manifest", "COLUMNS", "MANIFEST_NAME", "PARTS_DIR", "DONE", "FAILED", "read_rows", "write_rows",
           "latest", "format_row"]
