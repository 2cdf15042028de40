"""The runtime's entry point: ``python -m syntropism.launch [program]`` (default ``/workspace/main.py``).

A sandbox has no network interface but loopback. The runner hands it one way out: a Unix socket
(``SYNTROPISM_NATS_SOCKET``) that leads to NATS and nowhere else. This launcher listens on
``127.0.0.1:4222`` (``SYNTROPISM_NATS_LISTEN``) *before* the program starts, and a forked relay
process copies each TCP connection to a new connection on that socket, so any NATS client reaches
NATS at the URL ``env.json`` gives. The NATS server still checks the execution's credentials: the
relay grants nothing.

Debug mode (``SYNTROPISM_DEBUG=1``): the program runs under debugpy listening on
``127.0.0.1:5678`` and waiting for a client; the relay dials ``SYNTROPISM_DEBUG_SOCKET`` (a
listener of the runner's, published on the runner host's 127.0.0.1 only) and joins it to debugpy.

Without ``SYNTROPISM_NATS_SOCKET`` (e.g. on Kubernetes, where a NetworkPolicy lets the pod reach
NATS directly) the launcher just runs the program.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

DEFAULT_PROGRAM = "/workspace/main.py"
DEBUG_PORT = 5678
MAX_CONNECTIONS = 16


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def _join(a: socket.socket, b: socket.socket, slots: threading.Semaphore | None = None) -> None:
    def run() -> None:
        other = threading.Thread(target=_pipe, args=(b, a), daemon=True)
        other.start()
        _pipe(a, b)
        other.join()
        a.close()
        b.close()
        if slots is not None:
            slots.release()

    threading.Thread(target=run, daemon=True).start()


def _serve_nats(listener: socket.socket, path: str) -> None:
    slots = threading.Semaphore(MAX_CONNECTIONS)
    while True:
        client, _ = listener.accept()
        if not slots.acquire(blocking=False):
            client.close()
            continue
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(path)
        except OSError as error:
            print(f"syntropism relay: cannot reach NATS: {error}", file=sys.stderr)
            client.close()
            upstream.close()
            slots.release()
            continue
        _join(client, upstream, slots)


def _serve_debug(path: str) -> None:
    """One debugger session at a time: dial the runner, then join the dial to debugpy."""
    while True:
        runner = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            runner.connect(path)
            # The runner answers with one byte once a debugger has connected on its side.
            if runner.recv(1) != b"!":
                raise OSError("runner closed the debug channel")
        except OSError:
            runner.close()
            time.sleep(0.5)
            continue
        debugpy = None
        for _ in range(100):
            try:
                debugpy = socket.create_connection(("127.0.0.1", DEBUG_PORT))
                break
            except OSError:
                time.sleep(0.1)
        if debugpy is None:
            runner.close()
            continue
        done = threading.Event()

        def watch(a: socket.socket = runner, b: socket.socket = debugpy) -> None:
            t = threading.Thread(target=_pipe, args=(b, a), daemon=True)
            t.start()
            _pipe(a, b)
            t.join()
            a.close()
            b.close()
            done.set()

        threading.Thread(target=watch, daemon=True).start()
        done.wait()


def _relay(listener: socket.socket | None, nats_path: str | None, debug_path: str | None) -> None:
    threads = []
    if listener is not None and nats_path:
        threads.append(threading.Thread(target=_serve_nats, args=(listener, nats_path), daemon=True))
    if debug_path:
        threads.append(threading.Thread(target=_serve_debug, args=(debug_path,), daemon=True))
    for t in threads:
        t.start()
    # Lives as long as the program: the container ends when the program (PID 1) does.
    while True:
        time.sleep(3600)


def main(argv: list[str]) -> None:
    program = argv[1] if len(argv) > 1 else DEFAULT_PROGRAM
    nats_path = os.environ.get("SYNTROPISM_NATS_SOCKET")
    debug = os.environ.get("SYNTROPISM_DEBUG") == "1"
    debug_path = os.environ.get("SYNTROPISM_DEBUG_SOCKET") if debug else None
    listener = None
    if nats_path:
        host, _, port = os.environ.get("SYNTROPISM_NATS_LISTEN", "127.0.0.1:4222").rpartition(":")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host or "127.0.0.1", int(port)))
        listener.listen(64)
    if listener is not None or debug_path:
        # Listening before the fork: the program's first connection waits in the backlog.
        if os.fork() == 0:
            try:
                _relay(listener, nats_path, debug_path)
            finally:
                os._exit(0)
        if listener is not None:
            listener.close()
    python = sys.executable
    if debug:
        args = [python, "-m", "debugpy", "--listen", f"127.0.0.1:{DEBUG_PORT}", "--wait-for-client", program]
    else:
        args = [python, program]
    os.execv(python, args + argv[2:])


if __name__ == "__main__":
    main(sys.argv)
