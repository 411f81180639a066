"""Private files: the per-user data folder, all-or-nothing 0600 writes, bounded reads of key and certificate files.

Every file problem surfaces as ``IdentityError`` (``KeyFileExists`` when creating a file that is there) with
a one-line message that names the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

# Real key and certificate files are a few hundred bytes; the cap keeps a wrong path (a log, /dev/zero)
# from being read whole.
MAX_KEY_FILE_BYTES = 64 * 1024


class IdentityError(Exception):
    """A key file that cannot be read, written or trusted, or a bad peer id; the message names the cause."""


class KeyFileExists(IdentityError):
    """Creating a key file was refused because the file is already there."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} already exists")
        self.path = path


def default_data_dir() -> Path:
    """The per-user data folder: ``$XDG_DATA_HOME/hexgen``, or ``~/.local/share/hexgen``.

    A relative ``$XDG_DATA_HOME`` is ignored, as the XDG base-directory specification asks.
    """
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "hexgen"


def _make_private_dirs(folder: Path) -> None:
    """Create ``folder`` and any missing parents with mode 0700; existing folders are left as they are."""
    missing = []
    current = folder
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)


def write_private_file(path: Path, data: bytes, *, replace: bool) -> None:
    """Write ``data`` to ``path`` with mode 0600, all or nothing.

    The bytes go to a temporary file in the same folder first, so a crash or a concurrent reader never
    sees half a key. With ``replace`` the temporary file replaces ``path`` atomically; without it the
    file is hard-linked into place, which fails with ``KeyFileExists`` if ``path`` appeared meanwhile.
    Raises ``IdentityError`` for other file-system failures.
    """
    try:
        _make_private_dirs(path.parent)
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise IdentityError(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        try:
            # mkstemp already creates 0600; the chmod holds even under an unusual umask or ACL default.
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            if replace:
                os.replace(temp_name, path)
            else:
                _link_exclusively(Path(temp_name), path, data)
        except FileExistsError:
            raise KeyFileExists(path) from None
        except IsADirectoryError:
            raise IdentityError(f"cannot write {path}: it is a directory") from None
        except OSError as exc:
            raise IdentityError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)


def _link_exclusively(temp: Path, path: Path, data: bytes) -> None:
    """Put ``temp`` at ``path`` unless ``path`` exists (FileExistsError), falling back to O_EXCL."""
    try:
        os.link(temp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        # Some file systems (FAT, a few FUSE mounts) have no hard links: create exclusively instead.
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(data)


def read_small_file(path: Path, what: str) -> tuple[bytes, int]:
    """Up to ``MAX_KEY_FILE_BYTES`` of ``path`` and its permission bits.

    ``what`` names the file in messages ("key file", "certificate file"). Raises ``IdentityError`` for a
    missing, unreadable or oversized file.
    """
    try:
        with open(path, "rb") as file:
            mode = stat.S_IMODE(os.fstat(file.fileno()).st_mode)
            data = file.read(MAX_KEY_FILE_BYTES + 1)
    except FileNotFoundError:
        raise IdentityError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise IdentityError(f"{what} {path} is a directory") from None
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise IdentityError(f"{what} {path} is too large to be a {what}")
    return data, mode


def read_private_file(path: Path, what: str) -> bytes:
    """The bytes of a secret file, refusing one that other users may read or write (``IdentityError``)."""
    data, mode = read_small_file(path, what)
    if os.name != "nt" and mode & 0o077:
        raise IdentityError(f"{what} {path} is accessible to other users (mode {mode:04o}); run: chmod 600 {path}")
    return data
