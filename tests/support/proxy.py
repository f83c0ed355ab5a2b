"""A TCP relay on 127.0.0.1 that counts what passes and can slow it down: a slow network link
between two test peers, and a way to act (kill a server, say) once some data has gone through."""

import socket
import threading
import time

from tests.support import Service, free_port

_CHUNK = 64 * 1024


class Meter:
    """Bytes relayed, shared by several relays; lets a thread wait for a threshold."""

    def __init__(self) -> None:
        self.total = 0
        self._changed = threading.Condition()

    def add(self, count: int) -> None:
        with self._changed:
            self.total += count
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.total >= count, timeout)


class TcpRelay(Service):
    """Listens on 127.0.0.1:`port` and relays each connection to (target_host, target_port).

    `rate` (bytes per second, per direction and connection) bounds the throughput.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        rate: float | None = None,
        meter: Meter | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self.rate = rate
        self.meter = meter or Meter()
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> "TcpRelay":
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            # shutdown() wakes a thread blocked in recv(); close() alone would not.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self._listener is not None:
            self._listener.close()
        for thread in list(self._threads):
            thread.join(timeout=5)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            self._spawn(self._pump, client, server)
            self._spawn(self._pump, server, client)

    def _pump(self, source: socket.socket, destination: socket.socket) -> None:
        try:
            while True:
                data = source.recv(_CHUNK)
                if not data:
                    break
                if self.rate:
                    time.sleep(len(data) / self.rate)
                destination.sendall(data)
                self.meter.add(len(data))
        except OSError:
            pass
        finally:
            # Pass the end of the stream on; the other direction ends on its own.
            for sock, how in ((destination, socket.SHUT_WR), (source, socket.SHUT_RD)):
                try:
                    sock.shutdown(how)
                except OSError:
                    pass
