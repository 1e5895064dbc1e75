"""A TCP forwarder on 127.0.0.1, run as its own process, so a test can take a service "down" with a
signal and bring it back on the same address (an object store or network that drops out and
returns), while the service behind it keeps its state.

    python tests/tcp_proxy.py LISTEN_PORT TARGET_PORT
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading


def pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listen_port: int, target_port: int) -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen_port))
    server.listen(64)
    print("ready", flush=True)
    while True:
        client, _ = server.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", target_port))
        except OSError:
            client.close()
            continue
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pipe, args=(a, b), daemon=True).start()


def start(listen_port: int, target_port: int) -> subprocess.Popen:
    """The forwarder as its own process (its own session: a test kills it with os.killpg)."""
    proc = subprocess.Popen([sys.executable, __file__, str(listen_port), str(target_port)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
