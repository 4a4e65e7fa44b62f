"""The host's side of the command server protocol (sandboxes/default/cmdserver.py).

Each message is a 4-byte big-endian length then JSON, one request per connection (a unix
connect costs microseconds). Async sockets, so a command in flight holds no thread.

The socket file sits in a folder the sandbox can write to, so the sandbox could swap it for
a symlink to another sandbox's socket. The host therefore opens the path with O_PATH and
O_NOFOLLOW, checks that it is a socket, and connects through /proc/self/fd/N: the kernel
then connects to exactly that inode, and the path's length no longer meets the 108-byte
limit of sockaddr_un.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream
from pydantic import BaseModel, ConfigDict, ValidationError

from swarm.errors import SandboxError

PROTOCOL = 1
MAX_REPLY_OVERHEAD = 64 << 10


class ServerUnreachable(SandboxError):
    """The command server did not answer: its container may have died.

    refused: nothing listens on the socket (a dead server), as opposed to a connection that
    was accepted and then dropped (a server that could not start a thread: no pids left).
    """

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class ExecReply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    exit_code: int
    output: str
    truncated: bool = False
    timed_out: bool = False
    duration_s: float


class PingReply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    protocol: int
    hostname: str
    pid: int


def socket_ready(sock_path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    except OSError:
        return False


async def call(sock_path: Path, request: dict[str, Any], *, max_reply: int) -> dict[str, Any]:
    """Send one request, return the reply's JSON object. ServerUnreachable if none came."""
    try:
        fd = os.open(sock_path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ServerUnreachable(f"no command socket at {sock_path}: {exc.strerror}",
                                refused=True) from None
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ServerUnreachable(f"{sock_path} is not a socket", refused=True)
        stream = await anyio.connect_unix(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise ServerUnreachable(f"command server refused: {exc.strerror or exc}",
                                refused=True) from None
    finally:
        os.close(fd)
    async with stream:
        body = json.dumps(request).encode()
        try:
            await stream.send(struct.pack(">I", len(body)) + body)
            reader = BufferedByteReceiveStream(stream)
            (size,) = struct.unpack(">I", await reader.receive_exactly(4))
            if size > max_reply:
                raise SandboxError(f"command server sent {size} bytes, over {max_reply}")
            raw = await reader.receive_exactly(size)
        except (OSError, anyio.EndOfStream, anyio.IncompleteRead,
                anyio.BrokenResourceError) as exc:
            raise ServerUnreachable(f"command server hung up: {exc!r}") from None
    try:
        reply = json.loads(raw)
    except ValueError:
        raise SandboxError("command server sent something that is not JSON") from None
    if not isinstance(reply, dict):
        raise SandboxError("command server sent JSON that is not an object")
    if not reply.get("ok"):
        raise SandboxError(f"command server: {reply.get('error', 'unknown error')}")
    return reply


async def ping(sock_path: Path) -> PingReply:
    reply = await call(sock_path, {"op": "ping"}, max_reply=MAX_REPLY_OVERHEAD)
    try:
        return PingReply.model_validate(reply)
    except ValidationError as exc:
        raise SandboxError(f"command server's ping reply is malformed: {exc}") from None


async def run(sock_path: Path, command: str, *, timeout_s: float, cap: int,
              env: dict[str, str], cwd: str = "/workspace") -> ExecReply:
    request = {"op": "exec", "cmd": command, "timeout_s": timeout_s, "cap": cap,
               "cwd": cwd, "env": env}
    # JSON escapes each undecodable byte as \ufffd: 6 bytes of reply per byte of output.
    reply = await call(sock_path, request, max_reply=6 * cap + MAX_REPLY_OVERHEAD)
    try:
        return ExecReply.model_validate(reply)
    except ValidationError as exc:
        raise SandboxError(f"command server's exec reply is malformed: {exc}") from None
