"""Head clustering (kobattr.analyses.clustering; Clark et al. 2019 section 6): JS against scipy and its identities,
the streamed distance matrix against an all-in-memory computation on the eager model's own attentions (with
padding and several row blocks), MDS, MiniLM and the CLI."""

import json
import math
import os

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from test_cli import checkpoint, run  # noqa: F401  (fixture)

from kobattr.analyses import clustering
from kobattr.analyses.clustering import head_distances, js_divergence, mds, pairwise_js, smooth
from kobattr.models import default_model_path, load_default_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEXTS = ["The cat sat on the mat, and then it slept.", "Hello.", "A dog, a cat and a bird ran home to sleep."]


def test_js_equals_scipy_and_keeps_its_identities():
    torch.manual_seed(0)
    p = smooth(torch.softmax(3 * torch.randn(6, 9, dtype=torch.float64), -1))
    q = smooth(torch.softmax(3 * torch.randn(6, 9, dtype=torch.float64), -1))
    ours = js_divergence(p, q)
    for r in range(6):
        assert ours[r].item() == pytest.approx(jensenshannon(p[r].numpy(), q[r].numpy()) ** 2, rel=1e-10)
    assert torch.equal(js_divergence(p, q), js_divergence(q, p))
    assert js_divergence(p, p).abs().max().item() < 1e-15
    disjoint = torch.eye(9, dtype=torch.float64)[:2]  # two one-hot rows on different keys: the largest JS
    assert js_divergence(disjoint[:1], disjoint[1:]).item() == pytest.approx(math.log(2), rel=1e-12)
    assert js_divergence(smooth(disjoint[:1]), smooth(disjoint[1:])).item() < math.log(2)


def test_pairwise_js_is_the_sum_of_row_terms():
    torch.manual_seed(1)
    P = smooth(torch.softmax(2 * torch.randn(5, 4, 7, dtype=torch.float64), -1))
    D = pairwise_js(P)
    for a in range(5):
        for b in range(5):
            direct = sum(jensenshannon(P[a, i].numpy(), P[b, i].numpy()) ** 2 for i in range(4))
            assert D[a, b].item() == pytest.approx(direct, rel=1e-9, abs=1e-14)
    assert torch.equal(D, D.T) and torch.equal(D.diagonal(), torch.zeros(5, dtype=torch.float64))
    assert (D <= 4 * math.log(2)).all()


def test_all_zero_norm_rows_become_uniform():
    rows = torch.tensor([[0.0, 0.0, 0.0], [1.0, 3.0, 0.0]], dtype=torch.float64)
    assert clustering._normalize_rows(rows).tolist() == [[1 / 3, 1 / 3, 1 / 3], [0.25, 0.75, 0.0]]


def tiny_bert():
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                        vocab_size=tokenizer.vocab_size, max_position_embeddings=64, attn_implementation="eager")
    return BertModel(config).eval(), tokenizer


def direct_distances(model, tokenizer, texts):
    """{kind: K x K sums} and the token count, all maps of a text in memory, each text alone (no padding):
    alpha from output_attentions, norms alpha_ij ||f^h(x_j)|| from the hidden states and the weights."""
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    dh = model.config.hidden_size // H
    K = L * H
    sums = {k: np.zeros((K, K)) for k in ("weights", "norms")}
    tokens = 0
    for text in texts:
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            out = model(**enc, output_attentions=True, output_hidden_states=True)
            maps = {"weights": [], "norms": []}
            for li in range(L):
                att = model.encoder.layer[li].attention
                v = out.hidden_states[li][0] @ att.self.value.weight.T + att.self.value.bias
                alpha = out.attentions[li][0].double()
                for h in range(H):
                    f = v[:, h * dh:(h + 1) * dh] @ att.output.dense.weight[:, h * dh:(h + 1) * dh].T
                    nm = alpha[h] * f.norm(dim=-1).double()[None, :]
                    maps["weights"].append(alpha[h].numpy())
                    maps["norms"].append((nm / nm.sum(-1, keepdim=True)).numpy())
        n = enc["input_ids"].shape[1]
        tokens += n
        for kind, ms in maps.items():
            ms = [0.999 * m + 0.001 / n for m in ms]
            for a in range(K):
                for b in range(K):
                    sums[kind][a, b] += sum(jensenshannon(ms[a][i], ms[b][i]) ** 2 for i in range(n))
    return sums, tokens


@pytest.mark.parametrize("max_elements", [1 << 24, 300])  # one block of rows per batch / blocks of one or two rows
def test_streamed_distances_equal_a_direct_computation_with_padding(max_elements):
    model, tokenizer = tiny_bert()
    result = head_distances(model, tokenizer, TEXTS, batch_size=2, max_elements=max_elements, verify=1)
    expected, tokens = direct_distances(model, tokenizer, TEXTS)
    assert result["tokens"] == tokens and result["texts"] == 3 and len(result["labels"]) == 6
    for kind in ("weights", "norms"):
        got = np.array(result[kind]["sum"])
        np.testing.assert_allclose(got, expected[kind], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(np.array(result[kind]["mean"]), expected[kind] / tokens, rtol=1e-5, atol=1e-10)
        assert (got == got.T).all() and (np.diag(got) == 0).all()
    assert not np.allclose(expected["weights"], expected["norms"])  # the two kinds are really different maps
    json.dumps(result, allow_nan=False)


def test_mds_shape_determinism_and_errors(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 3))
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    a, b = mds(d, random_state=0), mds(d.tolist(), random_state=0)
    assert a.shape == (8, 2) and np.array_equal(a, b)
    # metric MDS of points that are nearly planar keeps their distances close
    flat = x.copy()
    flat[:, 2] *= 0.01
    df = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
    e = mds(df)
    np.testing.assert_allclose(np.linalg.norm(e[:, None] - e[None], axis=-1), df, atol=0.05)
    with pytest.raises(ValueError, match="square"):
        mds(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="symmetric"):
        mds(np.array([[0, 1.0], [2.0, 0]]))
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    with pytest.raises(ImportError, match=r"pip install kobattr\[clustering\]"):
        mds(d)


def test_minilm_quick_and_plot(tmp_path):
    model, tokenizer = load_default_model()
    result = clustering.add_mds(head_distances(model, tokenizer, TEXTS[:2], layers=[0, -1]))
    assert result["layers"] == [1, 6] and result["labels"][:2] == ["1-1", "1-2"] and result["labels"][-1] == "6-12"
    for kind in ("weights", "norms"):
        d = np.array(result[kind]["mean"])
        assert d.shape == (24, 24) and (d == d.T).all() and (d >= 0).all() and d.max() <= math.log(2)
        assert np.array(result["mds"][kind]).shape == (24, 2)
    assert result["worst_spot_check_error"] < 1e-3
    path = clustering.plot(result, tmp_path / "c.png")
    assert path.stat().st_size > 1000
    assert clustering.summary_lines(result)[0] == f"clustering: 24 heads, 2 texts, {result['tokens']} query tokens"


def test_cli_clustering_flag(checkpoint, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    code, stdout, err = run(["heads", "--model", checkpoint, "--limit", "3", "--clustering", "--out", str(out)], capsys)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    part = results["clustering"]
    assert part["texts"] == 3 and part["tokens"] == results["tokens"]  # the same sentences as the heads run
    assert len(part["mds"]["norms"]) == len(part["labels"]) == 4
    assert (out / "clustering.png").is_file() and "## Head clustering" in (out / "report.md").read_text()
    assert "clustering: 4 heads" in stdout
