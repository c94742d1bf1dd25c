"""File helpers that every kobattr module may use; this module imports no other kobattr module.

- ``atomic_write`` / ``write_safetensors``: a file appears complete or not at all.
- ``tensor_sha256`` / ``file_sha256``: the checksums that result files and corpus runs record.
- The output folder of a command (``kobattr analyze``, ``heads``, ``align``): ``staged_output`` locks it, builds a
  run in a staging directory beside it, the manifest (``kobattr_run.json``, the list of the run's files) last,
  and swaps the two directories atomically (see "a command's output folder" below).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch

MANIFEST = "kobattr_run.json"
STAGING_PREFIX = ".kobattr-partial-"  # staging directories that earlier kobattr versions made inside --out


class OutputError(ValueError):
    """An output folder that a command refuses to write into; the message is one sentence naming it."""


# what the system says when a file cannot be written (no space, a file size limit, no permission...): not a bug,
# so the commands report it as one line (kobattr.cli.main)
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                          errno.EXDEV, errno.EBUSY})


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
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as err:  # its I/O errors (a full disk, a file size limit) as the OSError they are
            code = re.search(r"os error (\d+)", str(err))
            if code is None:
                raise
            raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None

    atomic_write(path, write)


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
# How a run publishes (staged_output), so that two runs on one --out never mix and a reader never sees half a run:
# - The run takes an exclusive, non-blocking flock on --out's directory (created if missing) for its whole
#   duration; a second run on the same --out is refused at once with a one-line OutputError naming the first's pid.
# - It builds its files in a staging directory beside --out (".<name>.kobattr-stage-<hex>", on the same filesystem
#   so that renames are atomic), writes the manifest into it last, and swaps the staging directory and --out in one
#   atomic step (Linux renameat2 RENAME_EXCHANGE); the previous output, now under the staging name, is deleted.
#   Where the filesystem cannot exchange, the previous output is renamed aside and the new one into place: for a
#   moment there is none, never a mix.
# - A reader who opens --out once (a directory handle: os.open(out) with dir_fd=, /proc/self/fd/N/..., or --out as
#   its working directory) sees one complete run throughout, the old or the new, or finds files of the old one gone
#   once it is deleted; a reader who opens paths one by one may meet the old run's files and then the new run's.
# - Staging directories of runs that were killed (SIGKILL, power loss) are removed by the next run on that --out.
STAGE_MARK = ".kobattr-stage-"
# a test hook: a run that holds the lock creates <dir>/held before it publishes and waits until <dir>/release exists
HOLD_BEFORE_PUBLISH = "KOBATTR_HOLD_BEFORE_PUBLISH"


def _check_inside(root: Path, rel: str) -> None:
    """Refuse a listed path that would leave root (absolute, '..', or through a symlink)."""
    if Path(rel).is_absolute() or ".." in Path(rel).parts or \
            not os.path.realpath(root / rel).startswith(os.path.realpath(root) + os.sep):
        raise OutputError(f"{root / MANIFEST} lists {rel!r}, which is not inside --out; refusing to delete it.")


def previous_run(out: Path) -> None:
    """Refuse (OutputError) an ``out`` that --overwrite may not replace: it may hold only the files its manifest
    lists, the manifest, and staging directories that interrupted runs of older kobattr versions left inside it.
    Anything else (a symbolic link included) was not written by kobattr, and --overwrite never deletes it."""
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
    for rel in listed:
        _check_inside(out, rel)


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse (OutputError) an --out that is a symbolic link or a file, or that holds files unless ``overwrite``
    and they are all an earlier kobattr run's."""
    if out.is_symlink():
        raise OutputError(f"--out {str(out)!r} is a symbolic link; give the directory itself, so that nothing is "
                          "written or deleted outside it.")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {str(out)!r} is a file; give a directory (it is created if missing).")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(f"--out {str(out)!r} is not empty; choose a new or empty directory, or pass --overwrite "
                              "to replace what an earlier kobattr run wrote there.")
        previous_run(out)


def _lock_holder(fd: int) -> Optional[int]:
    """The pid of the process holding a flock on the open file ``fd``, from Linux's /proc/locks (None elsewhere)."""
    st = os.fstat(fd)
    exact, inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}", f":{st.st_ino}"
    candidates = []
    try:
        with open("/proc/locks", encoding="ascii") as fh:
            for line in fh:
                parts = line.split()  # "1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF"
                if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].endswith(inode):
                    candidates.append((parts[5] != exact, int(parts[4])))
    except (OSError, ValueError):
        return None
    return min(candidates)[1] if candidates else None


def lock_directory(out: Path) -> int:
    """A descriptor holding an exclusive, non-blocking flock on the existing directory ``out`` (closing it
    releases the lock); OutputError naming the holder's pid when another run holds it."""
    import fcntl

    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(fd)
        os.close(fd)
        raise OutputError(f"--out {str(out)!r} is in use by another kobattr run "
                          f"({'pid ' + str(holder) if holder else 'its pid unknown'}); wait for it to finish or "
                          "choose another directory.") from None
    return fd


def _lock(out: Path) -> tuple[int, bool]:
    """(a descriptor holding an exclusive flock on the directory ``out``, whether this call created it)."""
    created = False
    for _ in range(20):
        try:
            out.mkdir(parents=True)
            created = True
        except FileExistsError:
            pass
        check_output_folder(out, overwrite=True)  # a symlink or a file that appeared meanwhile
        fd = lock_directory(out)
        try:
            if os.path.samestat(os.fstat(fd), os.stat(out)):
                return fd, created
        except FileNotFoundError:
            pass
        os.close(fd)  # another run published (replaced the directory) between open and flock: lock the new one
    raise OutputError(f"--out {str(out)!r} keeps being replaced by other runs; try again.")


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directories ``a`` and ``b`` in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or filesystem cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _stage_pattern(out: Path) -> re.Pattern:
    return re.compile(re.escape(f".{out.name}{STAGE_MARK}") + "[0-9a-f]{12}")


def _new_stage(out: Path) -> Path:
    """An empty staging directory beside ``out`` with ``out``'s permissions (it becomes ``out``)."""
    while True:
        stage = out.with_name(f".{out.name}{STAGE_MARK}{secrets.token_hex(6)}")
        try:
            os.mkdir(stage, 0o700)
        except FileExistsError:
            continue
        os.chmod(stage, stat.S_IMODE(os.stat(out).st_mode))
        return stage


def _hold_for_tests() -> None:
    where = os.environ.get(HOLD_BEFORE_PUBLISH)
    if where:
        Path(where, "held").write_text(str(os.getpid()))
        while not Path(where, "release").exists():
            time.sleep(0.02)


@contextmanager
def staged_output(out: Path, manifest: Callable[[], dict], overwrite: bool = True):
    """A staging directory for one run into ``out``, published as described above: under the lock on ``out``,
    refused (OutputError) when ``out`` holds files and not ``overwrite``, or files an earlier kobattr run did not
    write. On success the manifest is written into the stage last and the stage replaces ``out`` atomically; on any
    failure (Ctrl-C, a full disk included) the stage is removed and ``out`` stays as it was (or is not created)."""
    out = Path(os.path.abspath(out))
    lock, created = _lock(out)
    stage = None
    try:
        check_output_folder(out, overwrite)  # again, under the lock: another run may have published meanwhile
        pattern = _stage_pattern(out)
        for stale in out.parent.iterdir():  # of runs on this --out that were killed
            if pattern.fullmatch(stale.name) and stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        stage = _new_stage(out)
        yield stage
        text = json.dumps(manifest(), ensure_ascii=False, indent=1)
        atomic_write(stage / MANIFEST, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        _hold_for_tests()
        if _exchange(stage, out):
            old = stage  # the previous output, now under the staging name
        else:
            old = _new_stage(out)
            os.rmdir(old)
            os.rename(out, old)
            os.rename(stage, out)
        stage = None
        fsync_directory(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        if created:
            try:
                out.rmdir()  # only if it is still empty
            except OSError:
                pass
        raise
    finally:
        os.close(lock)
