"""The sandbox's command server: the container's main process (under docker-init).

Why it exists: a `docker exec` costs about 70 ms of host CPU (dockerd, containerd, runc); a
command sent here costs a fork inside the container and a millisecond or so on the host.

Stdlib only, because it runs in whatever Python the image has. It listens on a unix socket
in a folder the host mounted (default /run/swarm/cmd.sock). Each message, both ways, is a
4-byte big-endian length then that many bytes of JSON; a connection may carry several
requests, one after another, and many connections are served at once (a thread each).

  {"op": "ping"}  ->  {"ok": true, "protocol": 1, "hostname": ..., "pid": ...}
  {"op": "exec", "cmd": str, "timeout_s": float, "cap": int, "cwd": str, "env": {...}}
      ->  {"ok": true, "exit_code": int, "output": str, "truncated": bool,
           "timed_out": bool, "duration_s": float}
  anything wrong  ->  {"ok": false, "error": str}

A command runs as `bash -c CMD` in its own session and process group, stdout and stderr
merged. When it ends, or when its timeout passes, every process of that group and session
is killed, and on timeout so is any process still carrying the command's marker variable
(a child that called setsid): a command leaves nothing running behind it. A command whose
caller hangs up (the host gave up on it, or was cancelled) is killed the same way.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

PROTOCOL = 1
MAX_REQUEST = 8 << 20
MAX_CAP = 16 << 20
# After the shell exits, how long output from its leftovers is still collected.
EXIT_GRACE_S = 0.1
MARKER = "SWARM_CMD_ID"
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PAGER": "cat",
    "GIT_PAGER": "cat",
}


class Capped:
    """Keeps the first and the last `cap // 2` bytes of a stream and counts the rest."""

    def __init__(self, cap: int) -> None:
        self.head_cap = cap // 2
        self.tail_cap = cap - self.head_cap
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data and self.tail_cap:
            self.tail += data
            if len(self.tail) > 2 * self.tail_cap:  # trim in batches, not on every chunk
                del self.tail[: len(self.tail) - self.tail_cap]

    def text(self) -> tuple[str, bool]:
        if len(self.tail) > self.tail_cap:
            del self.tail[: len(self.tail) - self.tail_cap]
        cut = self.total - len(self.head) - len(self.tail)
        if cut <= 0:
            return bytes(self.head + self.tail).decode("utf-8", "replace"), False
        head = self.head.decode("utf-8", "replace")
        tail = self.tail.decode("utf-8", "replace")
        return f"{head}\n[... {cut} bytes of output cut ...]\n{tail}", True


def _proc_ids(pid: int) -> tuple[int, int] | None:
    """(process group, session) of a live process; None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        if fields[0] == b"Z":
            return None
        return int(fields[2]), int(fields[3])
    except (OSError, IndexError, ValueError):
        return None


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


def kill_command(leader: int, marker: bytes | None) -> None:
    """SIGKILL the command's process group and session (and marked processes, if given).

    Repeated until a scan finds nothing, so a fork bomb that keeps forking is still emptied.
    """
    me = os.getpid()
    for _ in range(50):
        try:
            os.killpg(leader, signal.SIGKILL)
        except OSError:
            pass
        found = False
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) in (me, 1):
                continue
            pid = int(name)
            ids = _proc_ids(pid)
            if ids is None:
                continue
            if leader in ids or (marker is not None and _has_marker(pid, marker)):
                found = True
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if not found:
            return
        time.sleep(0.01)


def run_command(req: dict, client: socket.socket | None = None) -> dict:
    cmd = req["cmd"]
    if not isinstance(cmd, str):
        raise ValueError("cmd must be a string")
    timeout_s = max(0.01, float(req.get("timeout_s", 120)))
    cap = min(MAX_CAP, max(0, int(req.get("cap", 32_000))))
    cwd = str(req.get("cwd") or "/workspace")
    cmd_id = uuid.uuid4().hex
    env = dict(BASE_ENV)
    env.update({str(k): str(v) for k, v in (req.get("env") or {}).items()})
    env[MARKER] = cmd_id
    start = time.monotonic()
    deadline = start + timeout_s
    proc = subprocess.Popen(
        ["bash", "-c", cmd],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )
    assert proc.stdout is not None
    out = proc.stdout.fileno()
    os.set_blocking(out, False)
    # A pidfd turns readable when the shell exits, even while a background child still
    # holds the output pipe open: select() then wakes on either.
    pidfd = os.pidfd_open(proc.pid)
    sink = Capped(cap)
    timed_out = exited = gone = False
    out_open = True
    grace_until = deadline
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                timed_out = not exited
                break
            if exited and (not out_open or now >= grace_until):
                break
            poller = select.poll()  # not select(): fds past 1024 when many commands run
            if out_open:
                poller.register(out, select.POLLIN)
            if not exited:
                poller.register(pidfd, select.POLLIN)
            if client is not None:
                poller.register(client, select.POLLIN | select.POLLRDHUP)
            wait_ms = max(1, int(((grace_until if exited else deadline) - now) * 1000) + 1)
            ready = {fd for fd, _ in poller.poll(wait_ms)}
            if pidfd in ready:
                exited = True
                grace_until = min(deadline, time.monotonic() + EXIT_GRACE_S)
            if client is not None and client.fileno() in ready and _hung_up(client):
                timed_out = gone = True  # nobody waits for the result: stop the command
                break
            if out in ready:
                data = _read_some(out)
                if data == b"":
                    out_open = False  # the shell may still run with its output closed
                elif data:
                    sink.add(data)
    finally:
        kill_command(proc.pid, f"{MARKER}={cmd_id}".encode() if timed_out else None)
        _drain(out, sink)
        proc.stdout.close()
        code = proc.wait()
        os.close(pidfd)
    output, truncated = sink.text()
    if gone:
        output += "\n[the caller went away: the command was killed]"
        code = 124
    elif timed_out:
        output += f"\n[command timed out after {timeout_s:g}s and was killed]"
        code = 124
    elif code < 0:
        code = 128 - code  # killed by a signal: report it the way a shell does
    return {
        "ok": True,
        "exit_code": code,
        "output": output,
        "truncated": truncated,
        "timed_out": timed_out,
        "duration_s": round(time.monotonic() - start, 6),
    }


def _read_some(fd: int) -> bytes | None:
    """Some output, b"" at end of file, None when select() woke us for nothing."""
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _drain(fd: int, sink: Capped) -> None:
    """Collect what is left in the pipe once its writers are dead, without blocking."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        if not poller.poll(max(1, int((end - time.monotonic()) * 1000))):
            return
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            continue
        except OSError:
            return
        if not data:
            return
        sink.add(data)


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _send(conn: socket.socket, obj: dict) -> None:
    data = json.dumps(obj).encode()
    conn.sendall(struct.pack(">I", len(data)) + data)


def _hung_up(client: socket.socket) -> bool:
    try:
        return client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def handle(req: dict, client: socket.socket | None = None) -> dict:
    op = req.get("op", "exec")
    if op == "ping":
        return {"ok": True, "protocol": PROTOCOL, "hostname": socket.gethostname(),
                "pid": os.getpid()}
    if op == "exec":
        return run_command(req, client)
    return {"ok": False, "error": f"unknown op {op!r}"}


def serve_connection(conn: socket.socket) -> None:
    with conn:
        while True:
            header = _recv_exact(conn, 4)
            if header is None:
                return
            (size,) = struct.unpack(">I", header)
            if size > MAX_REQUEST:
                _send(conn, {"ok": False, "error": f"request of {size} bytes is too large"})
                return
            body = _recv_exact(conn, size)
            if body is None:
                return
            try:
                reply = handle(json.loads(body), conn)
            except Exception as exc:  # the boundary: any failure becomes an error reply
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            _send(conn, reply)


def serve(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    old = os.umask(0o077)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.umask(old)
    server.listen(256)
    while True:
        conn, _ = server.accept()
        try:
            threading.Thread(target=serve_connection, args=(conn,), daemon=True).start()
        except RuntimeError:
            # No thread left (the pids limit is used up, e.g. by a fork bomb): refuse this
            # one connection and keep serving.
            conn.close()


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    path = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("SWARM_SOCK", "/run/swarm/cmd.sock")
    serve(path)


if __name__ == "__main__":
    main()
