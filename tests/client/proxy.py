"""A small fault-injecting TCP proxy of ours, in front of a real server: latency, 5xx, drops, hangs."""

from __future__ import annotations

import asyncio
import threading

_BODY = b'{"error": {"message": "injected fault", "type": "x", "code": 503}}'
ERROR_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    + f"content-length: {len(_BODY)}\r\nconnection: close\r\n\r\n".encode()
    + _BODY
)


class FaultProxy:
    """mode: pass | latency | error | drop | hang (change it any time)."""

    def __init__(self, upstream_port: int, mode: str = "pass", latency_s: float = 0.0):
        self.upstream_port, self.mode, self.latency_s = upstream_port, mode, latency_s
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self.ready.wait(10)
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await reader.read(65536)
            if self.mode == "drop":
                return
            if self.mode == "hang":
                await asyncio.sleep(3600)
                return
            if self.mode == "error":
                writer.write(ERROR_503)
                await writer.drain()
                return
            delay = self.latency_s if self.mode == "latency" else 0.0
            await asyncio.sleep(delay)
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            up_writer.write(first)
            # keep-alive connections carry later requests too: delay each of them as well
            await asyncio.gather(self._pipe(reader, up_writer, delay), self._pipe(up_reader, writer))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float = 0.0) -> None:
        try:
            while data := await reader.read(65536):
                await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            try:
                writer.close()
            except RuntimeError:
                pass

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
