"""Where the sidecar listens: one resolver shared by the client and the sidecar.

The default is an ipc socket inside a per-user 0700 directory. ZeroMQ lets a
second bind to the same ipc path steal the socket, so the directory's owner
and mode are the access control: other users cannot connect, and the sidecar
refuses to serve from a directory that is not the user's own.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

ENV_ADDRESS = "KFORGE_SIDECAR_ADDR"
SOCKET_NAME = "sidecar.sock"
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_IPC_PATH = 107


def default_socket_dir() -> Path:
    """Per-user runtime directory: $XDG_RUNTIME_DIR if set, else /tmp."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "kforge-sidecar"
    return Path("/tmp") / f"kforge-sidecar-{os.getuid()}"


def resolve_address(address: str | None = None) -> str:
    """The explicit address, else $KFORGE_SIDECAR_ADDR, else the per-user ipc socket."""
    if address:
        return address
    env = os.environ.get(ENV_ADDRESS)
    if env:
        return env
    return f"ipc://{default_socket_dir() / SOCKET_NAME}"


def ipc_path(address: str) -> Path | None:
    """The filesystem path of an ipc:// address, or None for other transports."""
    if address.startswith("ipc://"):
        return Path(address[len("ipc://") :])
    return None


class SocketDirError(RuntimeError):
    """The socket directory is unsafe or unusable."""


def ensure_socket_dir(path: Path) -> None:
    """Create the socket's directory 0700, or check that an existing one is ours and private.

    Raises SocketDirError with a message a user can act on.
    """
    if len(str(path)) > MAX_IPC_PATH:
        raise SocketDirError(
            f"ipc path {path} is {len(str(path))} bytes; the limit is {MAX_IPC_PATH}. "
            f"Use a shorter directory (set {ENV_ADDRESS})."
        )
    directory = path.parent
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SocketDirError(f"cannot create socket directory {directory}: {exc}") from exc
    st = directory.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise SocketDirError(f"socket directory {directory} is not a directory")
    if st.st_uid != os.getuid():
        raise SocketDirError(
            f"socket directory {directory} belongs to uid {st.st_uid}, not to you "
            f"(uid {os.getuid()}); refusing to serve from it"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode != 0o700:
        raise SocketDirError(
            f"socket directory {directory} has mode {mode:04o}; it must be 0700 so other "
            f"users cannot reach the socket (chmod 700 {directory})"
        )
