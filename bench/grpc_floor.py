"""The transport floor of a Python gRPC service on this machine: the same client stream and unary call
our :class:`retrieval.client.Client` uses, against a ``grpc.aio`` server in another process whose
Search handlers do no work at all (an empty response). Nothing the service does can be faster.

    python -m bench.grpc_floor            # prints p50 / p99 in microseconds

:func:`measure` is what ``bench.service_speed`` runs beside the service, in the same run.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time

import numpy as np


def _serve(port_q) -> None:
    import grpc

    from retrieval.v1 import search_pb2, search_pb2_grpc

    class Echo(search_pb2_grpc.SearchServicer):
        async def Search(self, request, context):
            return search_pb2.SearchResponse(nq=1, k=request.k)

        async def SearchBatch(self, request, context):
            return search_pb2.SearchResponse(nq=1, k=request.k)

        async def SearchStream(self, request_iterator, context):
            async for request in request_iterator:
                yield search_pb2.SearchResponse(nq=1, k=request.k)

    async def main():
        server = grpc.aio.server()
        search_pb2_grpc.add_SearchServicer_to_server(Echo(), server)
        port_q.put(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def measure(n: int = 3000, d: int = 128) -> dict:
    """p50 / p99 (microseconds) of one 1-query round trip: the client's search stream and a unary call."""
    import grpc

    from retrieval.client import _Stream
    from retrieval.v1 import search_pb2, search_pb2_grpc

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(q,), daemon=True)
    proc.start()
    try:
        port = q.get(timeout=60)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = search_pb2_grpc.SearchStub(channel)
        req = search_pb2.SearchRequest(collection="floor", k=10)
        req.queries.data = np.zeros(d, np.float32).tobytes()
        req.queries.n, req.queries.d = 1, d
        stream = _Stream(stub)

        def timed(fn) -> tuple[float, float]:
            for _ in range(200):
                fn()
            ts = []
            for _ in range(n):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return float(np.percentile(ts, 50) * 1e6), float(np.percentile(ts, 99) * 1e6)

        s50, s99 = timed(lambda: stream.call(req))
        u50, u99 = timed(lambda: stub.SearchBatch(req))
        stream.close()
        channel.close()
        return {"stream_p50_us": s50, "stream_p99_us": s99, "unary_p50_us": u50, "unary_p99_us": u99, "n": n}
    finally:
        proc.terminate()
        proc.join(10)


if __name__ == "__main__":
    r = measure()
    print(f"empty gRPC round trip, client search stream: p50 {r['stream_p50_us']:.0f} us, p99 {r['stream_p99_us']:.0f} us")
    print(f"empty gRPC round trip, unary call:           p50 {r['unary_p50_us']:.0f} us, p99 {r['unary_p99_us']:.0f} us")
