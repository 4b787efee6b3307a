"""Expert-parallel accounting (tinymoe.parallel) against explicit per-token loops."""
import numpy as np
import pytest

from tinymoe import parallel as P

pytestmark = pytest.mark.parallel


def _random_routing(rng, N, E, K):
    """[N, K] distinct experts per row, best first (a random permutation prefix per token)."""
    return np.stack([rng.permutation(E)[:K] for _ in range(N)]).astype(np.int64)


def _loops(idx, E, G, home):
    """Nodes per token, sends, node load and node tokens by explicit Python loops."""
    per = E // G
    n_nodes, sends = [], []
    load, toks = [0] * G, [0] * G
    for t, row in enumerate(idx):
        seen = set()
        for e in row:
            node = int(e) // per
            load[node] += 1
            seen.add(node)
        for node in seen:
            toks[node] += 1
        n_nodes.append(len(seen))
        sends.append(len(seen - {int(home[t])}))
    return n_nodes, sends, load, toks


@pytest.mark.parametrize("E, G, K", [(32, 8, 8), (32, 8, 4), (12, 3, 5), (8, 8, 3)])
def test_counts_match_explicit_loops(E, G, K):
    rng = np.random.default_rng(E * 100 + G * 10 + K)
    idx = _random_routing(rng, 200, E, K)
    home = rng.integers(0, G, size=200)
    n_nodes, sends, load, toks = _loops(idx, E, G, home)
    assert P.nodes_per_token(idx, E, G).tolist() == n_nodes
    assert P.cross_node_sends(idx, E, G, home).tolist() == sends
    assert P.node_load(idx, E, G).tolist() == load
    assert P.node_tokens(idx, E, G).tolist() == toks
    # expert load summed per node is the node's compute load
    from tinymoe.analysis import expert_load
    assert P.node_load_from_expert_load(expert_load(idx, E), G).tolist() == load


def test_hand_examples():
    """E = 8 on G = 4 nodes (2 experts each): expert e on node e // 2."""
    idx = np.array([[0, 1, 2],      # nodes {0, 1}
                    [7, 6, 0],      # nodes {3, 0}
                    [5, 3, 1]])     # nodes {2, 1, 0}
    home = np.array([0, 1, 2])
    assert P.expert_nodes(idx, 8, 4).tolist() == [[0, 0, 1], [3, 3, 0], [2, 1, 0]]
    assert P.nodes_per_token(idx, 8, 4).tolist() == [2, 2, 3]
    # token 0 lives on node 0 (one of its targets): 1 send; token 1 on node 1 (no target): 2;
    # token 2 on node 2 (a target): 2
    assert P.cross_node_sends(idx, 8, 4, home).tolist() == [1, 2, 2]
    assert P.node_load(idx, 8, 4).tolist() == [4, 2, 1, 2]
    assert P.node_tokens(idx, 8, 4).tolist() == [3, 2, 1, 1]


def test_home_nodes_round_robin_by_sequence():
    h = P.home_nodes(5, 3, 2)
    assert h.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0]


def test_node_load_from_expert_load_per_step():
    load = np.arange(24).reshape(2, 12)          # 2 steps, 12 experts, 3 nodes of 4
    want = [[sum(range(4 * g, 4 * g + 4)) + 12 * s * 4 for g in range(3)] for s in range(2)]
    assert P.node_load_from_expert_load(load, 3).tolist() == want


def test_dispatch_bytes_v3_shape():
    """V3 (D 7168): FP8 payload 7168 B + 56 tiles x FP32 scale = 7392 B; BF16 combine 14336 B."""
    b = P.dispatch_bytes(7168)
    assert (b.dispatch, b.combine, b.total) == (7168 + 56 * 4, 2 * 7168, 7168 + 224 + 14336)
    assert P.dispatch_bytes(7168, scale_bytes=0).dispatch == 7168
    assert P.dispatch_bytes(7168, dispatch_bytes_per_element=2, scale_bytes=0).dispatch == 14336
    assert P.dispatch_bytes(130, tile=128).dispatch == 130 + 2 * 4     # a partial tile is a tile


def test_router_node_limit_holds():
    """The router's group-limited top-k (G nodes, keep M) never reaches more than M nodes, and
    without the limit random sigmoid routing of K = 8 of 32 reaches more than 4 nodes often."""
    from tinymoe.config import ModelConfig
    from tinymoe.layers.router import router_forward
    rng = np.random.default_rng(3)
    x = rng.standard_normal((500, 16))
    w = rng.standard_normal((32, 16))
    b = np.zeros(32)
    base = ModelConfig.preset("toy", n_routed_experts=32, n_activated_experts=8, dim=16,
                              score_func="sigmoid")
    for M in (2, 3, 4):
        cfg = base.replace(n_expert_groups=8, n_limited_groups=M)
        _, idx, _ = router_forward(x, w, b, cfg)
        assert P.nodes_per_token(idx, 32, 8).max() <= M
    _, idx, _ = router_forward(x, w, b, base.replace(n_expert_groups=1, n_limited_groups=1))
    assert (P.nodes_per_token(idx, 32, 8) > 4).mean() > 0.3


@pytest.mark.parametrize("call, match", [
    (lambda: P.nodes_per_token(np.zeros((2, 2), int), 10, 4), "G: 4 nodes must divide"),
    (lambda: P.nodes_per_token(np.array([[0, 9]]), 8, 4), "expert id 9"),
    (lambda: P.cross_node_sends(np.zeros((2, 2), int), 8, 4, np.array([0])), "home: expected"),
    (lambda: P.cross_node_sends(np.zeros((2, 2), int), 8, 4, np.array([0, 4])), "home: node 4"),
    (lambda: P.dispatch_bytes(0), "dim"),
    (lambda: P.node_load_from_expert_load(np.ones(10), 4), "G: 4 nodes"),
])
def test_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
