#!/usr/bin/env python
"""A TCP proxy that adds a fixed one-way delay to every byte each way, for benchmarks that need a
store with real round trips (an S3 endpoint on loopback answers in well under a millisecond).

Each direction forwards what it reads at its arrival time plus the delay, in order, without waiting
for earlier data to be acknowledged: a link with that latency and no bandwidth limit. A request's
round trip therefore grows by twice the delay, and requests in flight together overlap.

    python bench/latency_proxy.py --listen 9100 --upstream 127.0.0.1:9000 --delay-ms 10
"""
from __future__ import annotations

import argparse
import asyncio


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    async def receive() -> None:
        while True:
            data = await reader.read(1 << 16)
            await queue.put((loop.time() + delay, data))
            if not data:
                return

    async def send() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(receive(), send())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(listen_port: int, upstream_host: str, upstream_port: int, delay: float) -> None:
    async def connection(client_reader, client_writer) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(upstream_host, upstream_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_forward(client_reader, server_writer, delay),
                             _forward(server_reader, client_writer, delay))

    server = await asyncio.start_server(connection, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=int, required=True, help="loopback port to listen on")
    parser.add_argument("--upstream", required=True, help="host:port to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay each way, milliseconds")
    args = parser.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    asyncio.run(serve(args.listen, host, int(port), args.delay_ms / 1000))


if __name__ == "__main__":
    main()
