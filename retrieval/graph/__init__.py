"""Graph retrieval: a graph store, file readers, FastRP embeddings and NCN / NCNC link prediction.

- :mod:`retrieval.graph.graph`: the immutable in-memory :class:`Graph` (CSR + features + labels).
- :mod:`retrieval.graph.store`: :class:`GraphStore`, named graphs on disk with atomic updates.
- :mod:`retrieval.graph.readers`: edge lists, MATLAB ``.mat``, Planetoid, OGB link-prediction folders.
- :mod:`retrieval.graph.fastrp`: FastRP (Chen et al. 2019) and its job body.
- :mod:`retrieval.graph.ncn`: NCN / NCNC models (Wang et al. 2024) in plain torch.
- :mod:`retrieval.graph.linkpred`: splits, Hits@K, CN / Adamic-Adar, training (job body), scoring.

See docs/graph.md.
"""

from retrieval.graph.fastrp import FastRPParams, fastrp, fastrp_job
from retrieval.graph.graph import Graph, Labels
from retrieval.graph.readers import READERS, ReadResult, get_reader, read_graph
from retrieval.graph.store import GraphStore

__all__ = ["Graph", "Labels", "GraphStore", "READERS", "ReadResult", "get_reader", "read_graph", "FastRPParams",
           "fastrp", "fastrp_job"]
