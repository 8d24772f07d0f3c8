"""retrieval: a gRPC retrieval service.

Vector collections (HNSW / FAISS / exact), cross-encoder k-NN (ANNCUR), graph retrieval
(FastRP, NCN/NCNC) and n-gram draft lookups for speculative decoding, behind one server.
"""

__version__ = "0.1.0"

__all__ = ["AsyncClient", "Client", "__version__"]


def __getattr__(name: str):  # lazy: importing the package must not pull in grpc stubs eagerly
    if name == "Client":
        from retrieval.client import Client

        return Client
    if name == "AsyncClient":
        from retrieval.aio import AsyncClient

        return AsyncClient
    raise AttributeError(name)
