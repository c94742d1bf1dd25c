"""The peers' measures (spec section 10: ALTI, GlobEnc, Value Zeroing and their rollouts) against the materialising
reference on every block structure, against numbers computed by their authors' released code, and through analyze()."""

import pytest
import torch
from random_layers import KINDS, STRUCTURE_KINDS, random_layer
from test_cli import checkpoint, run  # noqa: F401 (the CLI's tiny checkpoint fixture)
from test_memory import LargestTensor
from transformers import BertConfig, BertForSequenceClassification

import kobattr
from kobattr.core import attribute
from kobattr.layer import LayerInputError
from kobattr.methods import methods_for
from kobattr.peers import check_rollout
from kobattr.reference import reference
from kobattr.result import Attribution

PEERS = ("alti", "alti_l2", "globenc", "value_zeroing", "flow_attn")


def peers_of(structure):
    return [m for m in PEERS if m in methods_for(structure)]


def row_error(got, ref):
    """max |got - ref| / max |ref| per row, worst row (kobattr.verify's measure)."""
    scale = ref.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    return ((got - ref).abs() / scale).max().item()


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_structure_matches_the_reference_with_padding_and_batches(kind):
    layer = random_layer(kind, N=11, B=2, pad=3)
    methods = peers_of(layer.structure)
    ref = reference(layer, methods=methods)
    res = attribute(layer, methods=methods, budget=1 << 9)  # many small tiles
    for m in methods:
        assert row_error(res.maps[m], ref["maps"][m]) < 1e-12, m
        assert torch.equal(res.ratios[m].isnan(), ref["ratios"][m].isnan())
        torch.testing.assert_close(res.ratios[m].nan_to_num(), ref["ratios"][m].nan_to_num(), rtol=0, atol=1e-12)
        assert res.maps[m][0, -3:].abs().max() == 0 and res.maps[m][0, :, -3:].abs().max() == 0  # padding
        assert res.spot_check[m].max() < 1e-9
    for m in ("alti", "alti_l2", "value_zeroing", "flow_attn"):  # rows sum to 1 on real tokens
        sums = res.maps[m].sum(-1)
        torch.testing.assert_close(sums[layer.valid], torch.ones_like(sums[layer.valid]))


def test_globenc_is_post_ln_only():
    assert "globenc" in methods_for("post")
    assert all("globenc" not in methods_for(s) for s in STRUCTURE_KINDS if s != "post")
    with pytest.raises(ValueError, match="globenc is defined for post"):
        attribute(random_layer("gpt2"), methods=["globenc"])


@pytest.mark.parametrize("structure", list(STRUCTURE_KINDS))
def test_alti_parts_and_bias_sum_to_the_block_output(structure):
    """sum_j T_i(x_j) + bias_i = y_i, the block output ALTI compares every part with (post-LN: the LN1 output; the
    others: the stream x_i + a_i), summed from the very tiles the map reduces."""
    layer = random_layer(STRUCTURE_KINDS[structure], N=9, pad=2)
    res = attribute(layer, methods=["alti"], budget=1 << 9)
    assert res.completeness["alti"].max() < 1e-13
    real = layer.forward()["mid" if structure == "post" else "y"]
    ref = reference(layer, methods=["attnresln_n" if structure == "post" else "attnres_n"])
    name = "attnresln_n" if structure == "post" else "attnres_n"
    torch.testing.assert_close(res.bias_norms["alti"], ref["bias"][name].norm(dim=-1))
    torch.testing.assert_close(ref["total"][name][layer.valid], real[layer.valid])


def test_float32_stays_near_the_float64_reference():
    """The L1 sums cancel (||y||_1 - ||y - T||_1): they are taken in float64, so float32 maps stay within the error
    of their float32 inputs."""
    exact = random_layer("bert", N=33, B=1, D=64, dtype=torch.float64)
    ref = reference(exact, methods=peers_of("post"))
    res = attribute(exact.to(dtype=torch.float32), methods=peers_of("post"))
    for m in peers_of("post"):
        assert row_error(res.maps[m].double(), ref["maps"][m]) < 2e-5, m


def test_rows_and_contractions():
    layer = random_layer("llama", N=10, pad=2)
    methods = peers_of("pre")
    ref = reference(layer, methods=methods)
    rows = torch.tensor([1, 4, 9])
    sub = attribute(layer, methods=methods, rows=rows)
    contract = torch.rand(2, 3, 10, dtype=torch.float64)
    con = attribute(layer, methods=methods, contract=contract, normalize_rows=True)
    for m in methods:
        assert row_error(sub.maps[m], ref["maps"][m][:, rows]) < 1e-12
        expected = contract @ kobattr.methods.row_normalize(ref["maps"][m])
        assert row_error(con.maps[m], expected) < 1e-12


def test_no_tensor_reaches_n_n_d():
    N, D = 257, 64
    for kind in ("bert", "sandwich_ln"):
        layer = random_layer(kind, N=N, B=1, D=D, F=128, dtype=torch.float32)
        with LargestTensor() as probe:
            attribute(layer, methods=peers_of(layer.structure), verify=0)
        assert probe.largest < N * N * D / 4, f"{kind}: {probe.op} made a tensor of {probe.largest} elements"


# --------------------------------------------------------------------------- the authors' numbers
def tiny_bert():
    """A 2-layer BERT whose every weight comes from one seeded generator (independent of torch's init)."""
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=50, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=2)
    model = BertForSequenceClassification(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            value = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3
            p.copy_((1 + value) if "LayerNorm.weight" in name else value)
    return model


IDS = torch.tensor([[2, 17, 5, 33, 9, 41, 3]])
# (layer 0, row 2), (layer 1, row 5) and the rollout's (layer 1, row 5) of each measure, from the authors' code
AUTHORS = {
    "alti": ([0.11028227210044861, 0.398750364780426, 0.18917730450630188, 0.1447734534740448, 0.0026050982996821404,
              0.0, 0.15441149473190308],
             [0.015507268719375134, 0.1316376030445099, 0.07684564590454102, 0.0842047855257988, 0.1670961081981659,
              0.17721103131771088, 0.3474975526332855],
             [0.0739099532365799, 0.21727964282035828, 0.17313726246356964, 0.23893608152866364, 0.05182178318500519,
              0.05907760560512543, 0.18583764135837555]),
    "alti_l2": ([0.10984941571950912, 0.3726387321949005, 0.22070366144180298, 0.1493162363767624,
                 0.020619777962565422, 0.0, 0.1268721967935562],
                [0.01671396940946579, 0.16008144617080688, 0.07496213167905807, 0.10143139958381653,
                 0.15779541432857513, 0.16116875410079956, 0.327846884727478],
                [0.0792231336236, 0.2253461331129074, 0.16786834597587585, 0.19737772643566132, 0.06988553702831268,
                 0.09167671203613281, 0.16862240433692932]),
    "globenc": ([0.19626612961292267, 0.829401969909668, 0.6775019764900208, 0.4846041202545166, 0.1369836926460266,
                 0.6380214691162109, 0.6896675229072571],
                [0.05740648880600929, 0.8781986832618713, 0.23765969276428223, 0.34423789381980896,
                 0.7339760661125183, 1.112840175628662, 1.1990350484848022],
                [1.5419819355010986, 3.6505043506622314, 2.872468948364258, 3.8291656970977783, 1.430196762084961,
                 2.8417229652404785, 3.4802451133728027]),
    "value_zeroing": ([0.021976697001144196, 0.23864868550597376, 0.00047605505441579524, 0.09640426678374711,
                       0.014373120725898726, 0.32609521766318084, 0.3020259572656396],
                      [0.000706745487265503, 0.32300486008777846, 0.012503678800805343, 0.05543015249939329,
                       0.17374367761596732, 0.040960577979231035, 0.39365030752955904],
                      [0.03279545444523687, 0.24376804464686236, 0.3586663794014873, 0.1340650175511666,
                       0.008403535625381134, 0.129270808426436, 0.09303075990342968]),
}


def test_the_authors_code_gives_the_same_numbers():
    """Numbers from each measure's released code, run in a throwaway script (not in this repository) on tiny_bert()
    and IDS, float32, eager attention:
    - alti / alti_l2: mt-upc/transformer-contributions@4f89039 src/contributions.py imported unmodified (pyaml_env
      and captum stubbed: get_contributions does not use them; their src/config.yaml), ModelWrapper(model)(batch);
      then src/utils_contributions.py normalize_contributions(data['contributions' / 'contributions_l2'],
      scaling='min_sum', resultant_norm=||resultants||_1 / _2) and compute_joint_attention (extracted with ast), as
      their attributions.py does.
    - globenc: mohsenfayyaz/GlobEnc@a26b38b src/modeling/modeling_bert.py: class BertNormOutput (extracted with ast)
      on the HF model's own tensors (hooks: layer input, value output, pre-LN1 input), then BertLayer.forward's LN2
      lines and BertEncoder.forward's rollout lines (extracted as text, executed) with pre-LN2 states from a hook.
    - value_zeroing: hmohebbi/ValueZeroing@57d448d scoring/value_zeroing.py's loop (each layer re-run per token t
      from the previous original hidden state with t's value vectors zeroed, here by a hook on attention.self.value,
      as customized_modeling_bert.py zeroes value_layer[:, :, t]; sklearn's cosine_distances as 1 - cos clipped to
      [0, 2]; rows divided by their sums) and its compute_joint_attention(res=False) (extracted with ast).
    The measures' small differences (their eps on the states and in F.pairwise_distance, float32 cosines) stay
    below 1e-5 of each row's largest entry."""
    model = tiny_bert()
    methods = [m for name in AUTHORS for m in (name, name + "_rollout")]
    res = kobattr.analyze(model, {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}, methods=methods)
    for name, (first, second, rolled) in AUTHORS.items():
        got = [res.maps[name][0, 0, 2], res.maps[name][1, 0, 5], res.maps[name + "_rollout"][1, 0, 5]]
        for g, expected in zip(got, (first, second, rolled)):
            assert row_error(g.double()[None], torch.tensor([expected], dtype=torch.float64)) < 1e-5, name
        torch.testing.assert_close(res.maps[name + "_rollout"][0], res.maps[name][0])


def test_analyze_rolls_out_through_the_layers_and_refuses_what_it_cannot():
    model = tiny_bert()
    batch = {"input_ids": torch.tensor([[2, 17, 5, 33, 9], [2, 8, 3, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
    res = kobattr.analyze(model, batch, methods=["alti", "alti_rollout", "globenc", "globenc_rollout"])
    for name in ("alti", "globenc"):
        maps = res.maps[name].double()
        torch.testing.assert_close(res.maps[name + "_rollout"][0].double(), maps[0])
        torch.testing.assert_close(res.maps[name + "_rollout"][1].double(), maps[1] @ maps[0])
        assert res.maps[name + "_rollout"][:, 1, 3:].abs().max() == 0  # padded rows stay zero
    text = kobattr.analyze(model, batch, methods=["alti_rollout"])
    alone = kobattr.analyze(model, {"input_ids": batch["input_ids"][1:, :3]}, methods=["alti_rollout"])
    torch.testing.assert_close(text.maps["alti_rollout"][:, 1, :3, :3], alone.maps["alti_rollout"][:, 0])
    with pytest.raises(LayerInputError, match="drop rows= and contract="):
        kobattr.analyze(model, batch, methods=["alti_rollout"], rows=[0])
    with pytest.raises(LayerInputError, match="consecutive layers"):
        check_rollout(["value_zeroing_rollout"], "post", [0, 2], None, None)


def test_cli_methods_name_the_peers(checkpoint, tmp_path, capsys):
    """`kobattr analyze --methods alti,value_zeroing_rollout` writes what analyze() computes."""
    out = tmp_path / "out"
    code, _, err = run(["analyze", "A small text.", "--model", checkpoint, "--out", str(out), "--methods",
                        "alti,value_zeroing_rollout", "--backend", "torch", "--no-plots"], capsys)
    assert code == 0, err
    saved = Attribution.load(out / "text000" / "attribution")
    assert saved.methods == ("alti", "value_zeroing_rollout")
    from transformers import AutoModel, AutoTokenizer

    direct = kobattr.analyze(AutoModel.from_pretrained(checkpoint).eval(), "A small text.",
                             tokenizer=AutoTokenizer.from_pretrained(checkpoint), methods=["alti", "value_zeroing"])
    torch.testing.assert_close(saved.maps["alti"], direct.maps["alti"])
    rolled = direct.maps["value_zeroing"]
    torch.testing.assert_close(saved.maps["value_zeroing_rollout"][1], rolled[1] @ rolled[0])


# ------------------------------------------------------------------------------------ information-flow routes
def tiny_gpt2():
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=50, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2Model(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            value = torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3
            p.copy_((1 + value) if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else value)
    return model


GPT2_IDS = torch.tensor([[7, 1, 22, 4, 39, 12]])
# per layer: row 4's attention edges (heads summed, the residual's share on (4, 4)), the FFN shares of every token
FLOW_AUTHORS = [
    ([0.014183768071234226, 0.034826334565877914, 0.4560507833957672, 0.09698710590600967, 0.3979502320289612,
      1.8326464896745165e-06],
     [0.7660732269287109, 0.8906794786453247, 0.7853647470474243, 0.772637128829956, 0.5580275058746338,
      0.8036347031593323]),
    ([0.041155144572257996, 0.00018187487148679793, 0.046800486743450165, 0.06463690847158432, 0.8472252488136292,
      3.4793137615451997e-07],
     [0.45279446244239807, 0.4199678599834442, 0.34818172454833984, 0.5028213858604431, 0.49702733755111694,
      0.41307228803634644]),
]


def test_flow_routes_equal_the_transparency_tools_numbers():
    """Numbers from facebookresearch/llm-transparency-tool@f1340f0 routes/contributions.py, imported unmodified in a
    throwaway script (typeguard.typechecked and jaxtyping.Float stubbed, einops 0.8.1): get_attention_contributions
    (heads summed, the residual's contribution added to (i, i), as build_full_graph sums the two edges) and
    get_mlp_contributions, on tiny_gpt2() and GPT2_IDS, with decomposed_attn built as their tlens_model.py does
    (pattern from the model's causal softmax, v with b_V, W_O per head) from the captured layers. The unseen key
    5 of row 4 differs by 1e-6 of the row's largest entry: their F.pairwise_distance adds 1e-6 to each difference."""
    from kobattr.flow import flow_routes

    graph = flow_routes(tiny_gpt2(), {"input_ids": GPT2_IDS})
    for layer, (row4, ffn) in enumerate(FLOW_AUTHORS):
        assert row_error(graph.attn[layer, 0, 4][None].double(), torch.tensor([row4], dtype=torch.float64)) < 1e-5
        assert row_error(graph.ffn[layer, 0][None], torch.tensor([ffn], dtype=torch.float64)) < 1e-5
        torch.testing.assert_close(graph.ffn[layer] + graph.residual[layer], torch.ones_like(graph.ffn[layer]))


def test_flow_routes_keep_the_edges_above_the_threshold_back_from_the_position(tmp_path):
    import json

    from kobattr.flow import flow_routes

    graph = flow_routes(tiny_gpt2(), {"input_ids": torch.tensor([[7, 1, 22, 4, 39, 12], [3, 9, 5, 0, 0, 0]]),
                                      "attention_mask": torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]])})
    route = graph.routes(4, threshold=0.04)
    assert all(w > 0.04 for _, _, w in route) and ("M1_4", "I1_4", pytest.approx(float(graph.ffn[1, 0, 4]))) in route
    for u, v, w in graph.edges(0):  # every strong edge into a node of the route is in the route
        if v in {b for _, b, _ in route} | {"I1_4"} and w > 0.04:
            assert (u, v, w) in route
    assert all(int(n.split("_")[1]) <= 4 for e in route for n in e[:2])  # causal: nothing from later tokens
    assert not any(n.endswith(("_3", "_4", "_5")) for e in graph.edges(1) for n in e[:2])  # padding has no nodes
    written = json.loads(graph.to_json(tmp_path / "route.json", position=4).read_text())
    assert written["edges"] == [list(e) for e in route] and written["threshold"] == 0.04
    with pytest.raises(ValueError, match="real token"):
        graph.routes(4, batch=1)


def test_peer_results_save_load_and_show(tmp_path):
    res = kobattr.analyze(tiny_bert(), {"input_ids": IDS}, methods=["alti", "globenc_rollout", "value_zeroing"])
    back = Attribution.load(res.save(tmp_path / "r.safetensors"))
    assert back.methods == res.methods
    for m in res.methods:
        torch.testing.assert_close(back.maps[m], res.maps[m])
        torch.testing.assert_close(back.ratios[m], res.ratios[m], equal_nan=True)
    page = res.save_html(tmp_path / "tokens.html", view="tokens").read_text(encoding="utf-8")
    assert all(m in page for m in res.methods)  # the view's measure selector offers each of them
