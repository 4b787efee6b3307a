"""Expert parallelism on paper: nodes per token, cross-node sends, dispatch bytes, node-level load.

indices [N, K] -> per-token node counts, [G] per-node loads, bytes per token (no arrays are sent).

Placement (DeepSeek-V3 3.2, 4.2): the E routed experts of a layer are split into G equal groups,
one group per node, expert e on node e // (E / G). This is the same grouping the router's
group-limited top-k uses (`n_expert_groups` = G nodes, `n_limited_groups` = M): V3's node-limited
routing (2.1.2) keeps, per token, the M nodes whose two best selection scores sum highest and
draws all K experts from them, so at most M nodes are reached.

Dispatch rule (V3 3.2.2): a token living on node h travels over InfiniBand ONCE per distinct
remote node it needs (to the GPU with the same in-node index), and is forwarded from there over
NVLink to every GPU of that node holding one of its experts. Combine retraces the route: the
expert outputs are gathered inside the node and travel back once per remote node. So per token

    n_t        = |{node(e) : e in S_t}|                    distinct nodes reached
    sends_t    = |{node(e) : e in S_t} minus {h_t}|        inter-node (IB) sends
    IB bytes_t = sends_t * (dispatch bytes + combine bytes)

V3 dispatches in FP8 (1 byte per element plus the quantisation scales of each 1 x 128 tile;
V3 3.3.3) and combines in BF16 (2 bytes per element). DeepEP's reference casts keep one FP32
scale per 128 channels, which is the default here (`scale_bytes` = 4, `tile` = 128).

Node-level load: a node's compute load is the number of (token, expert) assignments landing on
its experts; its traffic load is the number of tokens that reach it (each token once per node).
Node-level MaxVio = max / mean - 1 of either (tinymoe.analysis.maxvio).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tinymoe.analysis import _check_count, _check_indices


def _check_groups(E: int, G: int) -> int:
    """-> experts per node E / G, after checking that G divides E."""
    E, G = _check_count("E", E), _check_count("G", G)
    if E % G:
        raise ValueError(f"G: {G} nodes must divide the E = {E} routed experts")
    return E // G


def expert_nodes(indices, E: int, G: int) -> np.ndarray:
    """indices [N, K] -> int64 [N, K]: the node of every chosen expert, e // (E / G)."""
    per = _check_groups(E, G)
    return _check_indices(indices, E) // per


def _node_hits(indices, E: int, G: int) -> np.ndarray:
    """indices [N, K] -> bool [N, G]: True where the token needs at least one expert of the node."""
    nodes = expert_nodes(indices, E, G)
    hits = np.zeros((nodes.shape[0], G), dtype=bool)
    np.put_along_axis(hits, nodes, True, axis=1)
    return hits


def nodes_per_token(indices, E: int, G: int) -> np.ndarray:
    """indices [N, K] -> int64 [N]: n_t, the number of distinct nodes token t's experts live on."""
    return _node_hits(indices, E, G).sum(axis=1).astype(np.int64)


def home_nodes(n_sequences: int, seq_len: int, G: int) -> np.ndarray:
    """-> int64 [n_sequences * seq_len]: the node each token lives on before dispatch.

    Data-parallel attention keeps a whole sequence on one GPU; sequences are dealt round-robin
    over the G nodes (sequence b on node b mod G), tokens in row-major [B, T] order.
    """
    B = _check_count("n_sequences", n_sequences)
    T = _check_count("seq_len", seq_len)
    G = _check_count("G", G)
    return np.repeat(np.arange(B, dtype=np.int64) % G, T)


def cross_node_sends(indices, E: int, G: int, home) -> np.ndarray:
    """indices [N, K], home [N] -> int64 [N]: inter-node sends of each token (V3 3.2.2 rule).

    sends_t = number of distinct nodes among token t's experts other than its home node h_t.
    """
    hits = _node_hits(indices, E, G)
    h = np.asarray(home)
    if h.shape != (hits.shape[0],) or (h.size and not np.issubdtype(h.dtype, np.integer)):
        raise ValueError(f"home: expected int [{hits.shape[0]}] (one node per token), got "
                         f"{h.dtype} {list(h.shape)}")
    if h.size and (h.min() < 0 or h.max() >= G):
        raise ValueError(f"home: node {h.min() if h.min() < 0 else h.max()} is outside [0, G={G})")
    at_home = hits[np.arange(hits.shape[0]), h]
    return (hits.sum(axis=1) - at_home).astype(np.int64)


def node_load(indices, E: int, G: int) -> np.ndarray:
    """indices [N, K] -> int64 [G]: (token, expert) assignments per node (its compute load)."""
    nodes = expert_nodes(indices, E, G)
    return np.bincount(nodes.ravel(), minlength=G).astype(np.int64)


def node_tokens(indices, E: int, G: int) -> np.ndarray:
    """indices [N, K] -> int64 [G]: tokens that reach each node, each counted once per node."""
    return _node_hits(indices, E, G).sum(axis=0).astype(np.int64)


def node_load_from_expert_load(load, G: int) -> np.ndarray:
    """load [E] or [steps, E] -> node load [G] or [steps, G]: the sum over each node's experts."""
    c = np.asarray(load)
    if c.ndim not in (1, 2) or c.shape[-1] == 0:
        raise ValueError(f"load: expected [E] or [steps, E], got shape {list(c.shape)}")
    per = _check_groups(c.shape[-1], G)
    return c.reshape(c.shape[:-1] + (G, per)).sum(axis=-1)


class DispatchBytes(NamedTuple):
    dispatch: int     # bytes of one token sent to one node: FP8 payload + tile scales
    combine: int      # bytes of the token's combined expert output coming back (BF16)
    total: int        # dispatch + combine: one round trip over one link


def dispatch_bytes(dim: int, dispatch_bytes_per_element: int = 1, tile: int = 128,
                   scale_bytes: int = 4, combine_bytes_per_element: int = 2) -> DispatchBytes:
    """Hidden size D -> bytes of one token's dispatch and combine over one link.

    dispatch = D * dispatch_bytes_per_element + ceil(D / tile) * scale_bytes   (FP8 + scales)
    combine  = D * combine_bytes_per_element                                  (BF16)
    V3 (D = 7168): 7168 + 56 * 4 = 7,392 bytes out, 14,336 bytes back. Pass scale_bytes=0 for
    a payload without scales, dispatch_bytes_per_element=2 for a BF16 dispatch.
    """
    D = _check_count("dim", dim)
    b = _check_count("dispatch_bytes_per_element", dispatch_bytes_per_element)
    t = _check_count("tile", tile)
    s = _check_count("scale_bytes", scale_bytes, minimum=0)
    c = _check_count("combine_bytes_per_element", combine_bytes_per_element)
    out = D * b + -(-D // t) * s
    back = D * c
    return DispatchBytes(out, back, out + back)
