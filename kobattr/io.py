"""File helpers that every kobattr module may use; this module imports no other kobattr module.

- ``atomic_write`` / ``write_safetensors``: a file appears complete or not at all.
- ``tensor_sha256`` / ``file_sha256``: the checksums that result files and corpus runs record.
- The output folder of a command (``kobattr analyze``, ``heads``, ``align``): ``staged_output`` builds a run in a
  staging directory inside the folder and publishes it over the previous run's files, the manifest
  (``kobattr_run.json``, the list of the run's files) removed first and written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

MANIFEST = "kobattr_run.json"
STAGING_PREFIX = ".kobattr-partial-"


class OutputError(ValueError):
    """An output folder that a command refuses to write into; the message is one sentence naming it."""


# ------------------------------------------------------------------------------------------- single files
def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(temporary path)`` beside ``path``, fsync, rename onto ``path``: a crash leaves the previous
    file or none, never a partial one. The file gets the mode open() would give it (0o666 minus umask)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = os.stat(tmp).st_mode & 0o777  # 0o666 minus the umask, as open() gives
        write(tmp)
        os.chmod(tmp, mode)  # some writers (safetensors) recreate the file with mode 0o600
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_directory(path.parent)


def fsync_directory(path: Path) -> None:
    """Make the renames inside ``path`` durable; not possible on every platform."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_safetensors(path: Path, tensors: dict, metadata: dict) -> None:
    """``tensors`` as one .safetensors file (string ``metadata`` in its header), atomically."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# -------------------------------------------------------------------------------------------- checksums
def tensor_sha256(t) -> str:
    """SHA-256 of a CPU tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}\n".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------- a command's output folder
def _inside(root: Path, rel: str) -> Path:
    """root / rel, refusing any path that would leave root (absolute, '..', or through a symlink)."""
    target = root / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts or \
            not os.path.realpath(target).startswith(os.path.realpath(root) + os.sep):
        raise OutputError(f"{root / MANIFEST} lists {rel!r}, which is not inside --out; refusing to delete it.")
    return target


def previous_run(out: Path) -> list[Path]:
    """What --overwrite removes from ``out``: the files its manifest lists, the manifest, and staging
    directories of interrupted runs. Anything else in ``out`` was not written by kobattr: refuse."""
    listed: list[str] = []
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            listed = list(json.loads(manifest.read_text(encoding="utf-8"))["files"])
        except (ValueError, KeyError, TypeError) as err:
            raise OutputError(f"{manifest} is unreadable ({err}); remove --out's contents yourself.") from None
    ours = {os.path.normpath(rel) for rel in listed} | {MANIFEST}
    keep_dirs = {os.path.normpath(parent) for rel in ours for parent in map(str, Path(rel).parents)} - {"."}
    foreign = []
    for entry in sorted(out.rglob("*")):
        rel = os.path.normpath(entry.relative_to(out))
        if rel.split(os.sep)[0].startswith(STAGING_PREFIX):
            continue
        if rel in ours or (rel in keep_dirs and entry.is_dir() and not entry.is_symlink()):
            continue
        foreign.append(rel)
    if foreign:
        raise OutputError(f"--out {str(out)!r} holds {len(foreign)} file(s) kobattr did not write "
                          f"(e.g. {foreign[0]!r}); "
                          "--overwrite only replaces kobattr's own output, so move them or choose another directory.")
    staged = [p for p in out.iterdir() if p.name.startswith(STAGING_PREFIX)]  # of interrupted runs
    return [_inside(out, rel) for rel in listed] + staged + ([manifest] if manifest.is_file() else [])


def _publish(stage: Path, out: Path, previous: list[Path]) -> None:
    """Replace the previous run's files in ``out`` by the complete run in ``stage``, manifest last."""
    manifest = out / MANIFEST
    if manifest.exists():  # first, so that out never claims to hold a complete run while it changes
        manifest.unlink()
    for path in previous:
        if path == stage or not os.path.lexists(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for path in sorted({p.parent for p in previous if p.parent != out}, key=lambda p: -len(p.parts)):
        while path != out and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
            path = path.parent
    for entry in sorted(stage.iterdir()):
        if entry.name != MANIFEST:
            os.replace(entry, out / entry.name)
    os.replace(stage / MANIFEST, manifest)
    stage.rmdir()


@contextmanager
def staged_output(out: Path, manifest: Callable[[], dict]):
    """A staging folder inside ``out`` for one run; on success the manifest is written into it last and
    everything is published over the previous run's files, on any failure (Ctrl-C included) it is removed
    and ``out`` stays as it was (or is not created)."""
    previous = previous_run(out) if out.is_dir() and any(out.iterdir()) else []
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        yield stage
        (stage / MANIFEST).write_text(json.dumps(manifest(), ensure_ascii=False, indent=1), encoding="utf-8")
        _publish(stage, out, previous)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            try:
                out.rmdir()  # only if it is still empty
            except OSError:
                pass
        raise
