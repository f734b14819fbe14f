"""The server's CPU while connections linger: a measurement, not a test.

N clients each send one frame; the server's handler answers with a large
reply and returns, so every connection enters the lingering close; the
clients never read, so none of them can finish it before CLOSE_LINGER (30 s).
Meanwhile the server's CPU time is read from /proc/PID/stat over a window.

    python benchmarks/linger_cpu.py --connections 1000 --reply 1048576 --duration 10

Linux only (/proc). Prints one line: loop, connections, CPU % of one core.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

APP = textwrap.dedent(
    """
    import os

    REPLY = b"R" * int(os.environ["LINGER_REPLY"])


    async def answer_once(conn):
        await conn.recv()
        conn.send(REPLY)
    """
)


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--reply", type=int, default=1 << 20)
    parser.add_argument("--duration", type=float, default=10.0)
    # The set-up (1,000 connections, 1 GiB of replies queued) takes a few
    # seconds on CPython's loop; the window must start after it and end
    # before CLOSE_LINGER (30 s).
    parser.add_argument("--settle", type=float, default=8.0, help="seconds before measuring")
    parser.add_argument("--loop", default="asyncio")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, args.connections * 2 + 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))  # the children inherit it
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "lingerapp.py").write_text(APP)
        env = dict(os.environ, LINGER_REPLY=str(args.reply), PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), tmp]))
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fastnet",
                "serve",
                "lingerapp:answer_once",
                "--port",
                "0",
                "--loop",
                args.loop,
                "--max-connections",
                str(args.connections + 10),
                "--backlog",
                "4096",
                "--log-level",
                "warning",
            ],
            stdout=subprocess.PIPE,
            env=env,
            cwd=tmp,
        )
        try:
            assert server.stdout is not None
            line = server.stdout.readline().decode()
            port = int(line.rsplit(":", 1)[1])
            clients = []
            frame = (7).to_bytes(4, "big") + b"request"
            for _ in range(args.connections):
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(frame)
                clients.append(sock)
            time.sleep(args.settle)
            start = cpu_ticks(server.pid)
            time.sleep(args.duration)
            used = (cpu_ticks(server.pid) - start) / os.sysconf("SC_CLK_TCK")
            print(
                f"loop={args.loop} connections={args.connections} reply={args.reply} "
                f"server CPU {100 * used / args.duration:.1f}% of a core over {args.duration:g} s"
            )
            for sock in clients:
                sock.close()
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
