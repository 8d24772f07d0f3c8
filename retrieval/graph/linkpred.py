"""Link prediction: edge splits, Hits@K, heuristic baselines, NCN / NCNC training, and scoring.

Protocol (Wang et al. 2024, following PyG ``train_test_split_edges`` as their code calls it): the
undirected edges are shuffled with a seed; ``floor(test_frac m)`` go to test, ``floor(val_frac m)`` to
validation, the rest (70%) to training. Validation and test each get ``floor(test_frac m)`` distinct
negative pairs ``u < v`` that are not edges of the *full* graph (no self-loops), and never fewer than
the largest K of the reported Hits@K (``min_negatives``, 100): with fewer than K negatives Hits@K is
trivially 1.0. Models see only the training edges.

Hits@K (OGB's definition): the share of positive pairs scoring strictly above the K-th highest-scoring
negative pair (1.0 when there are fewer than K negatives).

Baselines computed on the training graph: common neighbours ``|N(u) & N(v)|`` and Adamic-Adar
``sum_{k in N(u) & N(v)} 1 / log deg(k)``.

Thread-safety: functions are pure; :class:`LinkScorer` serialises its calls with a lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from retrieval.errors import Cancelled, FailedPrecondition, InvalidArgument
from retrieval.graph.graph import Graph, as_node_ids
from retrieval.graph.ncn import Adj, LinkModel, NCNConfig, config_for_graph
from retrieval.storage import atomic

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# splits and negatives
# --------------------------------------------------------------------------------------------------
@dataclass
class LinkSplit:
    """Edge split of an undirected graph with ``n`` nodes. Arrays are int64 ``[P, 2]`` with ``u < v``."""

    n: int
    train: np.ndarray
    valid: np.ndarray
    valid_neg: np.ndarray
    test: np.ndarray
    test_neg: np.ndarray
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"n": self.n, "train": len(self.train), "valid": len(self.valid), "valid_neg": len(self.valid_neg),
                "test": len(self.test), "test_neg": len(self.test_neg), **self.info}


def undirected_edges(g: Graph) -> np.ndarray:
    """Each undirected non-loop edge once, ``u < v``, as int64 ``[m, 2]``."""
    s, d, _ = g.edges()
    keep = s != d
    e = np.stack([np.minimum(s[keep], d[keep]), np.maximum(s[keep], d[keep])], 1)
    return np.unique(e, axis=0) if len(e) else e.reshape(0, 2)


def sample_non_edges(n: int, count: int, forbidden_keys: np.ndarray, rng: np.random.Generator,
                     distinct: bool = True, upper: bool = True) -> np.ndarray:
    """``count`` random pairs (``u < v`` when ``upper``; never ``u == v``) whose key ``u * n + v`` (and
    ``v * n + u``) is not in the sorted array ``forbidden_keys``. ``distinct``: no pair twice."""
    if n < 2:
        raise InvalidArgument(f"cannot sample node pairs from a graph with {n} node(s)")
    total_pairs = n * (n - 1) // 2
    if distinct and count > total_pairs - len(forbidden_keys) // (1 if upper else 2):
        raise InvalidArgument(f"cannot sample {count} distinct non-edges: the graph has too few")
    out = np.zeros((0, 2), np.int64)
    seen = np.zeros(0, np.int64)
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > 1000:
            raise InvalidArgument(f"could not sample {count} non-edges (graph too dense?)")
        need = count - len(out)
        m = int(need * 1.3) + 16
        u = rng.integers(0, n, m, dtype=np.int64)
        v = rng.integers(0, n, m, dtype=np.int64)
        ok = u != v
        u, v = u[ok], v[ok]
        if upper:
            u, v = np.minimum(u, v), np.maximum(u, v)
        key = u * n + v
        if len(forbidden_keys):
            pos = np.searchsorted(forbidden_keys, key).clip(max=len(forbidden_keys) - 1)
            ok = forbidden_keys[pos] != key
            u, v, key = u[ok], v[ok], key[ok]
        if distinct:
            key, first = np.unique(key, return_index=True)
            u, v = u[first], v[first]
            if len(seen):
                pos = np.searchsorted(seen, key).clip(max=len(seen) - 1)
                ok = seen[pos] != key
                u, v, key = u[ok], v[ok], key[ok]
            # keep the draw order random (np.unique sorted them)
            p = rng.permutation(len(u))
            u, v, key = u[p], v[p], key[p]
        u, v, key = u[:need], v[:need], key[:need]
        out = np.concatenate([out, np.stack([u, v], 1)])
        if distinct:
            seen = np.sort(np.concatenate([seen, key]))
    return out


def sample_training_negatives(n: int, count: int, keys: torch.Tensor, generator: torch.Generator,
                              device: torch.device) -> torch.Tensor:
    """``count`` uniformly random ordered pairs ``(u, v)``, ``u != v``, whose key ``u * n + v`` is not in the
    sorted tensor ``keys`` (on ``device``); repeats are allowed (as PyG's ``negative_sampling``). Draws come
    from the CPU ``generator`` so a seed gives the same pairs on every device. Returns int64 ``[count, 2]``."""
    out = torch.empty((count, 2), dtype=torch.long, device=device)
    todo = torch.arange(count, device=device)
    for _ in range(100):
        m = todo.numel()
        if m == 0:
            return out
        uv = torch.randint(0, n, (m, 2), generator=generator).to(device)
        key = uv[:, 0] * n + uv[:, 1]
        bad = uv[:, 0] == uv[:, 1]
        if keys.numel():
            pos = torch.searchsorted(keys, key).clamp_(max=keys.numel() - 1)
            bad |= keys[pos] == key
        out[todo[~bad]] = uv[~bad]
        todo = todo[bad]
    raise InvalidArgument(f"could not sample {count} non-edges in 100 rounds (graph too dense?)")


def edge_keys(edges: np.ndarray, n: int, both: bool = True) -> np.ndarray:
    """Sorted int64 keys ``u * n + v`` of ``edges`` (and ``v * n + u`` when ``both``)."""
    e = np.asarray(edges, np.int64).reshape(-1, 2)
    k = e[:, 0] * n + e[:, 1]
    if both:
        k = np.concatenate([k, e[:, 1] * n + e[:, 0]])
    return np.unique(k)


def split_edges(g: Graph | np.ndarray, n: int | None = None, *, val_frac: float = 0.1, test_frac: float = 0.2,
                seed: int = 0, min_negatives: int = 100) -> LinkSplit:
    """Random edge split (see the module docstring). ``g``: a :class:`Graph` or an edge array ``[m, 2]``.

    Validation and test each get ``max(floor(test_frac m), min_negatives)`` negatives: Hits@K with
    fewer than K negatives is 1.0 whatever the scores, so ``min_negatives`` should be the largest K
    reported (default 100, for Hits@20/50/100). On graphs with ``floor(test_frac m) >= min_negatives``
    the split is the NCN code's, unchanged."""
    if isinstance(g, Graph):
        if g.directed:
            raise InvalidArgument("link-prediction splits need an undirected graph")
        n = g.n
        edges = undirected_edges(g)
    else:
        if n is None:
            raise InvalidArgument("pass n with an edge array")
        edges = np.asarray(g, np.int64).reshape(-1, 2)
        edges = np.unique(np.sort(edges, 1), axis=0)
        edges = edges[edges[:, 0] != edges[:, 1]]
    if not (0 < test_frac < 1 and 0 <= val_frac < 1 and val_frac + test_frac < 1):
        raise InvalidArgument(f"val_frac={val_frac}, test_frac={test_frac}: need 0 <= val, 0 < test, val + test < 1")
    m = len(edges)
    if m < 10:
        raise InvalidArgument(f"the graph has {m} edges; link prediction needs at least 10")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(m)
    n_t, n_v = int(math.floor(test_frac * m)), int(math.floor(val_frac * m))
    test = edges[perm[:n_t]]
    valid = edges[perm[n_t:n_t + n_v]]
    train = edges[perm[n_t + n_v:]]
    if isinstance(min_negatives, bool) or not isinstance(min_negatives, (int, np.integer)) or min_negatives < 0:
        raise InvalidArgument(f"min_negatives must be a non-negative integer, got {min_negatives!r}")
    n_neg = max(n_t, int(min_negatives))
    free = n * (n - 1) // 2 - m
    if 2 * n_neg > free:  # a tiny graph: every non-edge is a negative; Hits@K for K > n_neg stays trivial
        n_neg = max(n_t, free // 2)
        logger.warning("only %d non-edges: %d negatives each for validation and test (fewer than "
                       "min_negatives = %d; Hits@K above that is trivially 1.0)", free, n_neg, min_negatives)
    neg = sample_non_edges(n, 2 * n_neg, edge_keys(edges, n, both=False), rng, distinct=True, upper=True)
    return LinkSplit(n=n, train=train, valid=valid, valid_neg=neg[:n_neg], test=test, test_neg=neg[n_neg:],
                     info={"seed": seed, "val_frac": val_frac, "test_frac": test_frac, "protocol": "random",
                           "negatives": n_neg})


def official_split(train_graph: Graph, splits: dict) -> LinkSplit:
    """A :class:`LinkSplit` from an OGB reader result (``splits['valid'|'test']['edge'|'edge_neg']``)."""
    try:
        return LinkSplit(n=train_graph.n, train=undirected_edges(train_graph),
                         valid=splits["valid"]["edge"], valid_neg=splits["valid"]["edge_neg"],
                         test=splits["test"]["edge"], test_neg=splits["test"]["edge_neg"],
                         info={"protocol": "official"})
    except KeyError as e:
        raise InvalidArgument(f"the official split lacks {e}") from None


# --------------------------------------------------------------------------------------------------
# metrics and heuristics
# --------------------------------------------------------------------------------------------------
def hits_at_k(pos: np.ndarray, neg: np.ndarray, k: int) -> float:
    """Share of ``pos`` scores strictly above the ``k``-th highest ``neg`` score (OGB); 1.0 if < k negatives."""
    pos = np.asarray(pos, np.float64).ravel()
    neg = np.asarray(neg, np.float64).ravel()
    if k <= 0:
        raise InvalidArgument(f"k must be positive, got {k}")
    if pos.size == 0:
        raise InvalidArgument("hits_at_k needs at least one positive score")
    if neg.size < k:
        return 1.0
    kth = np.partition(neg, neg.size - k)[neg.size - k]
    return float((pos > kth).mean())


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC of positives vs negatives (ties count one half)."""
    from scipy.stats import rankdata

    pos, neg = np.asarray(pos, np.float64).ravel(), np.asarray(neg, np.float64).ravel()
    r = rankdata(np.concatenate([pos, neg]))
    return float((r[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def _train_adj(n: int, train: np.ndarray) -> sp.csr_matrix:
    e = np.asarray(train, np.int64)
    A = sp.coo_matrix((np.ones(2 * len(e), np.float32), (np.r_[e[:, 0], e[:, 1]], np.r_[e[:, 1], e[:, 0]])),
                      shape=(n, n)).tocsr()
    A.data[:] = 1.0
    return A


def common_neighbor_scores(A: sp.csr_matrix, pairs: np.ndarray, batch: int = 65536) -> np.ndarray:
    """``|N(u) & N(v)|`` for each pair, from a 0/1 symmetric CSR ``A``."""
    return _pair_dot(A, A, pairs, batch)


def adamic_adar_scores(A: sp.csr_matrix, pairs: np.ndarray, batch: int = 65536) -> np.ndarray:
    """``sum_{k in N(u) & N(v)} 1 / log(deg k)`` (a common neighbour has degree >= 2)."""
    deg = np.asarray(A.sum(1)).ravel()
    w = np.zeros_like(deg, dtype=np.float64)
    w[deg > 1] = 1.0 / np.log(deg[deg > 1])
    Aw = sp.csr_matrix(A @ sp.diags(w))
    return _pair_dot(A, Aw, pairs, batch)


def _pair_dot(A: sp.csr_matrix, B: sp.csr_matrix, pairs: np.ndarray, batch: int) -> np.ndarray:
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    out = np.zeros(len(pairs), np.float64)
    for s in range(0, len(pairs), batch):
        p = pairs[s:s + batch]
        out[s:s + batch] = np.asarray(A[p[:, 0]].multiply(B[p[:, 1]]).sum(1)).ravel()
    return out


def heuristic_results(split: LinkSplit, ks=(20, 50, 100)) -> dict:
    """Hits@K and AUC of common neighbours and Adamic-Adar on the test split (training graph only)."""
    A = _train_adj(split.n, split.train)
    out = {}
    for name, fn in (("CN", common_neighbor_scores), ("AA", adamic_adar_scores)):
        t0 = time.perf_counter()
        pos, neg = fn(A, split.test), fn(A, split.test_neg)
        res = {f"hits@{k}": hits_at_k(pos, neg, k) for k in ks}
        res["auc"] = auc(pos, neg)
        res["seconds"] = time.perf_counter() - t0
        out[name] = res
    return out


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------
def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        from retrieval.device import torch_device

        return torch.device(torch_device())
    if device == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition("device='cuda' was asked for but torch sees no CUDA GPU")
    return torch.device(device)


def to_torch_features(x, device: torch.device, sparse_below: float = 0.1):
    """Node features -> a torch tensor on ``device``; sparse COO when the density is below ``sparse_below``."""
    if sp.issparse(x):
        X = sp.coo_matrix(x, dtype=np.float32)
        dens = X.nnz / max(1, X.shape[0] * X.shape[1])
    else:
        X = np.asarray(x, np.float32)
        dens = np.count_nonzero(X) / max(1, X.size)
    if dens < sparse_below:
        X = sp.coo_matrix(X)
        X.sum_duplicates()
        idx = torch.from_numpy(np.vstack([X.row, X.col]).astype(np.int64))
        return torch.sparse_coo_tensor(idx, torch.from_numpy(X.data.astype(np.float32)), X.shape,
                                       is_coalesced=True, check_invariants=False).to(device)
    return torch.from_numpy(np.ascontiguousarray(X)).to(device)


def fastrp_features(n: int, train: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """FastRP (GDS defaults, 3 iterations with weights 0, 1, 1) of the training graph, standardised."""
    from retrieval.graph.fastrp import FastRPParams, fastrp

    A = _train_adj(n, train)
    return fastrp(A, FastRPParams(dim=dim, iteration_weights=(0.0, 1.0, 1.0), s=3.0, standardize=True, seed=seed))


@dataclass
class TrainResult:
    """What a training run produced. ``best``: metrics at the best validation evaluation."""

    model: LinkModel
    x: object
    adj: Adj
    config: NCNConfig
    best: dict
    history: list
    epoch_seconds: list
    device: str
    stopped_early: bool = False
    input_features: np.ndarray | None = None

    def summary(self) -> dict:
        return {"best": self.best, "epochs_run": len(self.epoch_seconds),
                "mean_epoch_seconds": float(np.mean(self.epoch_seconds)) if self.epoch_seconds else 0.0,
                "stopped_early": self.stopped_early, "device": self.device}


@torch.no_grad()
def predict_logits(model: LinkModel, h: torch.Tensor, adj: Adj, pairs, batch: int) -> np.ndarray:
    """Logits for ``pairs`` ``[P, 2]`` given node representations ``h`` (model in eval mode)."""
    pairs = torch.as_tensor(np.asarray(pairs, np.int64).reshape(-1, 2), device=h.device)
    out = []
    for s in range(0, pairs.shape[0], batch):
        p = pairs[s:s + batch]
        out.append(model.score(h, adj, p[:, 0], p[:, 1]).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def evaluate(model: LinkModel, x, adj: Adj, split: LinkSplit, cfg: NCNConfig, ks=(20, 50, 100),
             parts=("valid", "test")) -> dict:
    """Hits@K (and AUC) on the requested parts of ``split``, with the training adjacency."""
    model.eval()
    with torch.no_grad():
        h = model.encode(x, adj)
        freeze = getattr(model.predictor, "freeze", None)
        if freeze is not None:
            freeze(h, fold_linear=False)  # h + xlin(h) once, not once per batch (same numbers)
        try:
            out = {}
            for part in parts:
                pos = predict_logits(model, h, adj, getattr(split, part), cfg.test_batch_size)
                neg = predict_logits(model, h, adj, getattr(split, part + "_neg"), cfg.test_batch_size)
                res = {f"hits@{k}": hits_at_k(pos, neg, k) for k in ks}
                res["auc"] = auc(pos, neg)
                out[part] = res
        finally:
            if freeze is not None:
                model.predictor.unfreeze()
    return out


def _config_hash(cfg: NCNConfig, split: LinkSplit, seed: int) -> str:
    h = hashlib.sha256(json.dumps(cfg.as_dict(), sort_keys=True).encode())
    h.update(np.ascontiguousarray(split.train).tobytes())
    h.update(str(seed).encode())
    return h.hexdigest()[:16]


def _model_input(split: LinkSplit, features, cfg: NCNConfig, dev, seed: int):
    """``(x, in_dim, input_features)``: the encoder's input for ``cfg.input`` (given features, FastRP
    features computed from the training edges, or ``None`` for a learnable table)."""
    n = split.n
    if cfg.input == "features":
        if features is None:
            raise InvalidArgument("input='features' needs node features; use input='learnable' or 'fastrp' "
                                  "for a featureless graph")
        if features.shape[0] != n:
            raise InvalidArgument(f"features must have {n} rows, got shape {features.shape}")
        return to_torch_features(features, dev), features.shape[1], None
    if cfg.input == "fastrp":
        input_features = fastrp_features(n, split.train, cfg.fastrp_dim, seed)
        return to_torch_features(input_features, dev), cfg.fastrp_dim, input_features
    return None, cfg.hidden, None


@dataclass
class _Run:
    """The state of a training run that a checkpoint (``last.pt``) carries across a restart."""

    history: list = field(default_factory=list)
    epoch_seconds: list = field(default_factory=list)
    best: dict | None = None
    best_val: float = -1.0
    since_best: int = 0
    start_epoch: int = 1

    def resume(self, last: Path, tag: str, model, opt, gen, dev) -> None:
        """Continue from ``last`` when it was written by a run of the same config, split and seed."""
        if not last.exists():
            return
        state = torch.load(last, map_location=dev, weights_only=True)
        if state.get("tag") != tag:
            return
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["torch_rng"])
        gen.set_state(state["gen_rng"])
        self.history, self.epoch_seconds = json.loads(state["history"]), json.loads(state["epoch_seconds"])
        self.best = json.loads(state["best"]) if state["best"] else None
        self.best_val, self.since_best = float(state["best_val"]), int(state["since_best"])
        self.start_epoch = int(state["epoch"]) + 1
        logger.info("resuming link-model training at epoch %d", self.start_epoch)

    def save(self, last: Path, tag: str, epoch: int, model, opt, gen) -> None:
        """Checkpoint after ``epoch`` (atomic: a kill mid-save keeps the previous one)."""
        ckpt = {"tag": tag, "epoch": epoch, "model": model.state_dict(), "opt": opt.state_dict(),
                "torch_rng": torch.get_rng_state(), "gen_rng": gen.get_state(),
                "history": json.dumps(self.history),
                "epoch_seconds": json.dumps(self.epoch_seconds), "best": json.dumps(self.best) if self.best else "",
                "best_val": self.best_val, "since_best": self.since_best}
        atomic.write_with(last, lambda f: torch.save(ckpt, f))


def _save_best(path: Path, model, cfg: NCNConfig, best: dict) -> None:
    """The weights of the best epoch so far, with the config and metrics the stored model reports."""
    state = {"model": model.state_dict(), "config": json.dumps(cfg.as_dict()), "best": json.dumps(best)}
    atomic.write_with(path, lambda f: torch.save(state, f))


def _train_epoch(model, opt, x, train, full_adj, train_keys, cfg: NCNConfig, bs: int, gen, dev, ctx) -> list[float]:
    """One epoch over a fresh permutation of the training edges with fresh negatives; the batch losses."""
    n, E = full_adj.n, train.shape[0]
    model.train()
    perm = torch.randperm(E, generator=gen).to(dev)
    neg = sample_training_negatives(n, E, train_keys, gen, dev)
    losses = []
    nb = max(1, E // bs)  # the last incomplete batch is dropped, as in the reference
    if cfg.max_batches is not None:
        nb = min(nb, cfg.max_batches)
    for bi in range(nb):
        if ctx is not None and bi:
            ctx.check_cancelled()  # a cancel lands within a batch; last.pt / best.pt stay as they were
        idx = perm[bi * bs:(bi + 1) * bs]
        pos_e = train[idx]
        adj = full_adj.remove_edges(pos_e[:, 0], pos_e[:, 1]) if cfg.mask_target else full_adj
        h = model.encode(x, adj)
        pos_out = model.score(h, adj, pos_e[:, 0], pos_e[:, 1])
        neg_e = neg[idx]
        neg_out = model.score(h, adj, neg_e[:, 0], neg_e[:, 1])
        loss = -F.logsigmoid(pos_out).mean() - F.logsigmoid(-neg_out).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def train_link_model(split: LinkSplit, features=None, cfg: NCNConfig | None = None, *, seed: int = 0,
                     device: str | None = None, ctx=None, work_dir: str | Path | None = None,
                     ks=(20, 50, 100), time_budget: float | None = None, log=None) -> TrainResult:
    """Train an NCN / NCNC / GCN link predictor on ``split.train`` and select the epoch with the best
    validation Hits@``cfg.hits_k``; report the test metrics of that epoch.

    ``features``: ``[n, f]`` node features (dense or scipy sparse) for ``cfg.input == 'features'``.
    ``ctx``: a :class:`retrieval.jobs.JobContext` (progress per epoch, cancellation). ``work_dir``: where
    ``best.pt`` and ``last.pt`` checkpoints go; with the same config, split and seed a restarted run
    resumes after its last finished epoch. Deterministic on CPU for a given seed. ``time_budget``:
    seconds of wall time after which no new epoch starts (the last epoch is evaluated). ``log``: a
    callable receiving each epoch's record (for benchmarks).
    """
    cfg = (cfg or NCNConfig()).validate()
    dev = resolve_device(device)
    n = split.n
    if len(split.train) == 0:
        raise InvalidArgument("the training split has no edges")
    torch.manual_seed(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x, in_dim, input_features = _model_input(split, features, cfg, dev, seed)

    train = torch.from_numpy(np.asarray(split.train, np.int64)).to(dev)
    full_adj = Adj.from_edges(train[:, 0], train[:, 1], n)
    train_keys = torch.from_numpy(edge_keys(split.train, n, both=True)).to(dev)

    model = LinkModel(in_dim, cfg, num_nodes=n).to(dev)
    opt = torch.optim.Adam(model.param_groups())

    wd = Path(work_dir) if work_dir is not None else (Path(ctx.work_dir) if ctx is not None else None)
    tag = _config_hash(cfg, split, seed)
    run = _Run()
    if wd is not None:
        wd.mkdir(parents=True, exist_ok=True)
        run.resume(wd / "last.pt", tag, model, opt, gen, dev)
    history, epoch_seconds = run.history, run.epoch_seconds

    E = train.shape[0]
    bs = min(cfg.batch_size, E)
    holdout = len(split.valid) > 0  # no validation edges (evaluate="none"): every epoch is the best so far
    stopped = False
    t_start = time.perf_counter()
    for epoch in range(run.start_epoch, cfg.epochs + 1):
        if ctx is not None:
            ctx.check_cancelled()
        t0 = time.perf_counter()
        losses = _train_epoch(model, opt, x, train, full_adj, train_keys, cfg, bs, gen, dev, ctx)
        secs = time.perf_counter() - t0
        epoch_seconds.append(secs)
        last_epoch = epoch == cfg.epochs or (time_budget is not None and time.perf_counter() - t_start > time_budget)
        rec = {"epoch": epoch, "loss": float(np.mean(losses)), "train_seconds": secs}
        if not holdout:
            run.best = {"epoch": epoch}
            if wd is not None:
                _save_best(wd / "best.pt", model, cfg, run.best)
        elif epoch % cfg.eval_every == 0 or last_epoch:
            t1 = time.perf_counter()
            val = evaluate(model, x, full_adj, split, cfg, ks, parts=("valid",))["valid"]
            rec["valid"] = val
            # Hits@K is 1.0 whatever the scores with fewer than K negatives: select by AUC then
            score = val[f"hits@{cfg.hits_k}"] if len(split.valid_neg) >= cfg.hits_k else val["auc"]
            if score > run.best_val:
                run.best_val, run.since_best = score, 0
                test = evaluate(model, x, full_adj, split, cfg, ks, parts=("test",))["test"]
                run.best = {"epoch": epoch, "valid": val, "test": test}
                rec["test"] = test
                if wd is not None:
                    _save_best(wd / "best.pt", model, cfg, run.best)
            else:
                run.since_best += 1
            rec["eval_seconds"] = time.perf_counter() - t1
        history.append(rec)
        logger.info("epoch %d loss %.4f val %s (%.2fs)", epoch, rec["loss"],
                    rec.get("valid", {}).get(f"hits@{cfg.hits_k}"), secs)
        if wd is not None:
            run.save(wd / "last.pt", tag, epoch, model, opt, gen)
        if ctx is not None:
            ctx.progress(epoch, cfg.epochs, "link-model epochs")
        if log is not None:
            log(rec)
        if last_epoch and epoch < cfg.epochs:
            stopped = True
            logger.info("time budget of %.0f s used up after epoch %d", time_budget, epoch)
            break
        if cfg.patience is not None and run.since_best >= cfg.patience:
            stopped = True
            logger.info("early stop at epoch %d (no better validation for %d evaluations)", epoch, run.since_best)
            break
    # restore the best weights
    if wd is not None and (wd / "best.pt").exists():
        model.load_state_dict(torch.load(wd / "best.pt", map_location=dev, weights_only=True)["model"])
    # without a work_dir the final weights are kept (best metrics are still reported)
    model.eval()
    return TrainResult(model=model, x=x, adj=full_adj, config=cfg, best=run.best or {}, history=history,
                       epoch_seconds=epoch_seconds, device=str(dev), stopped_early=stopped,
                       input_features=input_features)


# --------------------------------------------------------------------------------------------------
# stored models: the training job and the scorer
# --------------------------------------------------------------------------------------------------
EVALUATE_MODES = ("holdout", "none")


def all_edges_split(g: Graph) -> LinkSplit:
    """Every edge for training, nothing held out (``evaluate="none"``)."""
    z = np.zeros((0, 2), np.int64)
    return LinkSplit(n=g.n, train=undirected_edges(g), valid=z, valid_neg=z, test=z, test_neg=z,
                     info={"protocol": "none"})


def ncn_train_job(ctx, *, store_root: str, graph: str, model_name: str = "ncn", preset: str | None = None,
                  config: dict | None = None, seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.2,
                  device: str | None = None, evaluate: str = "holdout") -> dict:
    """Job body: train a link predictor on a stored undirected graph and store it with the graph.

    The graph's edges are split at random (``seed``); the model with the best validation Hits@K is saved
    as ``<graph>/models/<model_name>/model.pt`` with ``model.json`` (config, metrics, graph version) and,
    for FastRP input, the input features. Progress: one unit per epoch. Returns the metrics.

    ``evaluate``: ``holdout`` (the split above; the validation and test edges are stored with the model
    as ``held_out.npy`` and masked when it serves, so ScoreLinks / PredictLinks see the graph the model was
    evaluated on and held-out links can be predicted) or ``none`` (train on every edge, no metrics, the last
    epoch is the model; serving sees every edge).
    """
    from retrieval.graph.store import GraphStore

    store = GraphStore(store_root)
    g = store.load(graph)
    version = store.version(graph)
    cfg, chosen = config_for_graph(preset, g.n, g.num_edges - g.num_self_loops, g.features is not None, config)
    logger.info("training %s/%s with preset %s", graph, model_name, chosen)
    if cfg.input == "features" and g.features is None:
        raise InvalidArgument(f"graph {graph!r} has no node features: set config input='learnable' or 'fastrp'")
    if evaluate not in EVALUATE_MODES:
        raise InvalidArgument(f"evaluate must be one of {list(EVALUATE_MODES)}, got {evaluate!r}")
    if evaluate == "none":
        split = all_edges_split(g)
    else:
        split = split_edges(g, val_frac=val_frac, test_frac=test_frac, seed=seed,
                            min_negatives=max(cfg.hits_k, 100))
    try:
        res = train_link_model(split, g.features, cfg, seed=seed, device=device, ctx=ctx, work_dir=ctx.work_dir)
    except Cancelled:
        kept = _store_best_checkpoint(store, graph, model_name, Path(ctx.work_dir), cfg, g, split, seed, version,
                                      evaluate)
        if kept is not None:
            logger.info("training of %s/%s cancelled; kept the best epoch so far (%s)", graph, model_name, kept)
        raise
    mdir = store.models_dir(graph, model_name)
    state = {k: v.detach().cpu() for k, v in res.model.state_dict().items()}
    atomic.write_with(mdir / "model.pt", lambda f: torch.save(state, f))
    if res.input_features is not None:
        atomic.save_npy(mdir / "input_features.npy", res.input_features.astype(np.float32))
    held = _save_held_out(mdir, split, evaluate)
    meta = {"config": cfg.as_dict(), "graph_version": version, "seed": seed, "split": split.describe(),
            "metrics": res.best, "summary": res.summary(), "in_dim": _in_dim(cfg, g, res), "n": g.n,
            "evaluate": evaluate, "held_out_edges": held, "preset": chosen}
    atomic.write_json(mdir / "model.json", meta, sort_keys=True)
    return {"graph": graph, "model": model_name, "metrics": res.best, "summary": res.summary(),
            "graph_version": version, "evaluate": evaluate, "held_out_edges": held, "preset": chosen}


def _save_held_out(mdir: Path, split: LinkSplit, evaluate: str) -> int:
    """Store the validation + test edges of a holdout model (``held_out.npy``, int64 [P, 2]); returns P."""
    f = mdir / "held_out.npy"
    if evaluate != "holdout":
        if f.exists():
            f.unlink()
        return 0
    held = np.concatenate([np.asarray(split.valid, np.int64).reshape(-1, 2),
                           np.asarray(split.test, np.int64).reshape(-1, 2)])
    atomic.save_npy(f, held)
    return len(held)


def _store_best_checkpoint(store, graph: str, model_name: str, work: Path, cfg: NCNConfig, g: Graph,
                           split: LinkSplit, seed: int, version: int, evaluate: str = "holdout") -> int | None:
    """After a cancel: store the best epoch so far (``best.pt`` of the work folder) as the graph's model
    ``model_name`` (``model.json`` says ``"partial": true``); returns that epoch, or None when no epoch was
    evaluated yet (then nothing is stored and an earlier model of that name stays)."""
    f = work / "best.pt"
    if not f.exists():
        return None
    ckpt = torch.load(f, map_location="cpu", weights_only=True)
    if json.loads(ckpt["config"]) != cfg.as_dict():
        return None  # a checkpoint of another configuration
    best = json.loads(ckpt["best"])
    last = work / "last.pt"
    epochs_run = None
    if last.exists():
        epochs_run = int(torch.load(last, map_location="cpu", weights_only=True)["epoch"])
    mdir = store.models_dir(graph, model_name)
    if cfg.input == "fastrp":  # the input the model was trained with (deterministic in the seed)
        atomic.save_npy(mdir / "input_features.npy",
                        fastrp_features(split.n, split.train, cfg.fastrp_dim, seed).astype(np.float32))
    state = {k: v.detach().cpu() for k, v in ckpt["model"].items()}
    atomic.write_with(mdir / "model.pt", lambda fh: torch.save(state, fh))
    in_dim = int(g.features.shape[1]) if cfg.input == "features" else (cfg.fastrp_dim if cfg.input == "fastrp"
                                                                         else cfg.hidden)
    held = _save_held_out(mdir, split, evaluate)
    meta = {"config": cfg.as_dict(), "graph_version": version, "seed": seed, "split": split.describe(),
            "metrics": best, "summary": {"best": best, "epochs_run": epochs_run, "cancelled": True},
            "partial": True, "in_dim": int(in_dim), "n": g.n, "evaluate": evaluate, "held_out_edges": held}
    atomic.write_json(mdir / "model.json", meta, sort_keys=True)
    return int(best["epoch"])


def _in_dim(cfg: NCNConfig, g: Graph, res: TrainResult) -> int:
    if cfg.input == "features":
        return int(g.features.shape[1])
    if cfg.input == "fastrp":
        return int(cfg.fastrp_dim)
    return int(cfg.hidden)


def mask_edges(g: Graph, edges: np.ndarray) -> Graph:
    """``g`` without the undirected ``edges`` ``[P, 2]`` (features and labels kept)."""
    e = undirected_edges(g)
    if not len(edges) or not len(e):
        return g
    drop = edge_keys(edges, g.n, both=True)
    keep = ~np.isin(e[:, 0] * g.n + e[:, 1], drop)
    return Graph.from_edges(g.n, e[keep, 0], e[keep, 1], directed=False, features=g.features, labels=g.labels)


class LinkScorer:
    """Serves a trained link model over a graph: ``score(pairs)`` -> probabilities, ``predict(node, ...)``
    -> top-k new neighbours among candidates.

    Node representations are computed once (with the graph's current full adjacency) and cached, with
    what the predictor's :meth:`~retrieval.graph.ncn.NCNPredictor.freeze` caches (the scores are the
    plain model's up to float rounding). ``quantize``: ``None`` (exact fp32, the default) or ``"int8"``
    (opt-in, approximate: the NCN / NCNC pair MLPs run with dynamically quantised int8 weights, about
    1.3-1.5x faster on CPU; see bench/results/graph/predict_latency_blogcatalog.md for how far it moves
    the scores). Thread-safety: calls are serialised by an internal lock.
    """

    def __init__(self, model: LinkModel, x, adj: Adj, graph: Graph, batch: int = 8192,
                 quantize: str | None = None) -> None:
        from retrieval.graph.ncn import QUANTIZE_MODES

        if quantize not in QUANTIZE_MODES:
            raise InvalidArgument(f"quantize must be one of {list(QUANTIZE_MODES)}, got {quantize!r}")
        self.model = model.eval()
        self.x = x
        self.adj = adj
        self.graph = graph
        self.batch = int(batch)
        self.quantize = quantize
        self._lock = threading.Lock()
        with torch.inference_mode():
            self.h = model.encode(x, adj)
            freeze = getattr(model.predictor, "freeze", None)
            if freeze is not None:  # what every call would recompute for all n nodes, computed once
                freeze(self.h, quantize=quantize)
            elif quantize is not None:
                raise InvalidArgument(f"quantize={quantize!r} needs an NCN or NCNC model, not "
                                      f"{model.cfg.predictor!r}")

    @staticmethod
    def from_training(res: TrainResult, graph: Graph, quantize: str | None = None) -> "LinkScorer":
        return LinkScorer(res.model, res.x, res.adj, graph, res.config.test_batch_size, quantize=quantize)

    @staticmethod
    def load(store, graph: str, model_name: str, device: str | None = None,
             quantize: str | None = None) -> "LinkScorer":
        """Load ``<graph>/models/<model_name>`` from a :class:`GraphStore` (``quantize``: see the class)."""
        from retrieval.errors import NotFound

        g = store.load(graph)
        mdir = store.path(graph) / "models" / model_name
        if not (mdir / "model.json").exists():
            raise NotFound(f"graph {graph!r} has no model {model_name!r} (known: {store.list_models(graph)})")
        meta = json.loads((mdir / "model.json").read_text())
        cfg = NCNConfig.from_dict(meta["config"])
        if int(meta["n"]) != g.n and cfg.input != "features":
            raise FailedPrecondition(f"model {model_name!r} was trained on {meta['n']} nodes but graph {graph!r} "
                                     f"now has {g.n}; retrain it")
        dev = resolve_device(device)
        model = LinkModel(int(meta["in_dim"]), cfg, num_nodes=int(meta["n"])).to(dev)
        model.load_state_dict(torch.load(mdir / "model.pt", map_location=dev, weights_only=True))
        if cfg.input == "features":
            if g.features is None:
                raise FailedPrecondition(f"graph {graph!r} lost its node features; the model needs them")
            x = to_torch_features(g.features, dev)
        elif cfg.input == "fastrp":
            x = to_torch_features(np.load(mdir / "input_features.npy", allow_pickle=False), dev)
        else:
            x = None
        # a holdout model serves on the graph it was evaluated on: its held-out edges leave the adjacency
        # (message passing, common neighbours); PredictLinks still skips them as existing neighbours
        seen = g
        if meta.get("evaluate", "holdout") == "holdout" and (mdir / "held_out.npy").exists():
            seen = mask_edges(g, np.load(mdir / "held_out.npy", allow_pickle=False))
        e = torch.from_numpy(undirected_edges(seen)).to(dev)
        adj = Adj.from_edges(e[:, 0], e[:, 1], g.n)
        return LinkScorer(model, x, adj, g, cfg.test_batch_size, quantize=quantize)

    def score(self, pairs) -> np.ndarray:
        """Probabilities (sigmoid of the logits) for node pairs ``[P, 2]``; float32 ``[P]``."""
        p = np.asarray(pairs)
        if p.ndim != 2 or p.shape[1] != 2:
            raise InvalidArgument(f"pairs must have shape [P, 2], got {p.shape}")
        as_node_ids(p[:, 0], "pairs[:, 0]", self.graph.n)
        as_node_ids(p[:, 1], "pairs[:, 1]", self.graph.n)
        with self._lock, torch.inference_mode():
            logits = predict_logits(self.model, self.h, self.adj, p.astype(np.int64), self.batch)
        return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)

    def predict(self, node: int, candidates=None, k: int = 10, exclude_neighbors: bool = True):
        """Top-``k`` new neighbours of ``node`` among ``candidates`` (default: every node), best first.

        Existing neighbours and ``node`` itself are skipped when ``exclude_neighbors``. Returns
        ``(ids int64 [<=k], probabilities float32)``; fewer than ``k`` when fewer candidates remain.
        """
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise InvalidArgument(f"k must be a positive integer, got {k!r}")
        u = int(as_node_ids([node], "node", self.graph.n)[0])
        cand = np.arange(self.graph.n, dtype=np.int64) if candidates is None else \
            np.unique(as_node_ids(candidates, "candidates", self.graph.n))
        if exclude_neighbors:
            nb, _ = self.graph.neighbors(u)
            cand = cand[~np.isin(cand, nb) & (cand != u)]
        if cand.size == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        probs = self.score(np.stack([np.full(cand.size, u), cand], 1))
        top = np.argsort(-probs, kind="stable")[:k]
        return cand[top], probs[top]


__all__ = ["LinkSplit", "split_edges", "official_split", "undirected_edges", "sample_non_edges", "edge_keys",
           "hits_at_k", "auc", "common_neighbor_scores", "adamic_adar_scores", "heuristic_results",
           "train_link_model", "evaluate", "TrainResult", "ncn_train_job", "LinkScorer", "resolve_device",
           "all_edges_split", "mask_edges", "EVALUATE_MODES"]
