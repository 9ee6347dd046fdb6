"""A TCP forwarder on 127.0.0.1 for outage tests: an object store or a dashboard that goes away.

:meth:`TcpProxy.stop` refuses new connections and drops the open ones, as a network partition, a
restarting endpoint or a dropped ``kubectl port-forward`` does; :meth:`TcpProxy.start` brings it back on
the same port. :meth:`TcpProxy.drop` only drops the open connections (both sockets closed) and keeps
accepting new ones; :meth:`TcpProxy.freeze` leaves them open but silent (a partition nobody notices).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target``; can be cut off and restored."""

    def __init__(self, target: int) -> None:
        self.target = target
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.listener: socket.socket | None = None
        self.connections: list[socket.socket] = []
        self.frozen: set[socket.socket] = set()
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Accept connections (again) on :attr:`port`."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self.lock:
            self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self, reset: bool = False) -> None:
        """Refuse new connections and drop the open ones (see :meth:`drop`)."""
        with self.lock:
            listener, self.listener = self.listener, None
        if listener is not None:
            # close() alone leaves the socket listening while the accept thread is blocked on it (Linux):
            # shutdown() stops it listening and wakes that thread, so the port is free for start().
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        self.drop(reset=reset)

    def drop(self, reset: bool = False) -> int:
        """Close both sockets of every open connection (with ``reset``, abortively: the peers get a TCP
        RST instead of a FIN); new connections are still accepted. Returns how many sockets it closed."""
        with self.lock:
            connections, self.connections = self.connections, []
            self.frozen.difference_update(connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                if reset:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                else:
                    conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        return len(connections)

    def freeze(self) -> int:
        """Blackhole every open connection: it stays open but carries nothing more either way, as after a
        silent network partition (no FIN, no RST); new connections work. Returns how many sockets."""
        with self.lock:
            self.frozen.update(self.connections)
            return len(self.connections)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.listener is not listener:  # stopped while this one was being connected
                    client.close()
                    upstream.close()
                    return
                self.connections += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if source not in self.frozen:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
