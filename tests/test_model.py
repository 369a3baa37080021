"""The scPRINT-2 network and its checkpoints (models/)."""

import math
import pickle
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import scprint1_style_config

from models import (
    CheckpointError,
    build_model,
    load_checkpoint,
    preset_config,
    random_model,
    save_checkpoint,
)
from models.checkpoint import read_checkpoint
from models.network import Block, SelfAttention

torch.set_num_threads(2)


def random_inputs(model, n_cells=6, length=48, n_neighbors=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = len(model.config.vocabulary)
    genes = torch.stack([torch.randperm(vocab, generator=g)[:length] for _ in range(n_cells)])
    counts = torch.poisson(torch.rand(n_cells, length, generator=g) * 4, generator=g)
    knn = torch.poisson(torch.rand(n_cells, n_neighbors, length, generator=g) * 4, generator=g)
    dists = torch.rand(n_cells, n_neighbors, generator=g) * 5
    return genes, counts, knn, dists


@pytest.fixture(scope="module")
def tiny():
    return random_model(preset_config("tiny"), seed=0)


def test_small_preset_has_published_widths_and_keys():
    model = random_model(preset_config("small"))
    config = model.config
    assert sum(w for _, w in config.embedding_blocks) == 424
    assert sum(config.topk.values()) == 23
    sd = model.state_dict()
    n_genes = len(config.vocabulary)
    expected = {
        "gene_encoder.0.embeddings.weight": (n_genes, 256),
        "gene_encoder.1.weight": (256, 256),
        "gene_encoder.3.weight": (256, 256),
        "pos_encoder.pe": (n_genes, 1, 256),
        "expr_encoder.neighbors_layers.0.weight": (256, 2),
        "expr_encoder.neighbors_layers.1.weight": (256,),
        "expr_encoder.neighbors_layers.4.weight": (256, 256),
        "expr_encoder.self_layers.0.weight": (256, 1),
        "expr_encoder.shared_layers.0.weight": (256, 512),
        "class_encoder.embedding.weight": (10, 256),
        "transformer.blocks.7.mixer.Wqkv.weight": (768, 256),
        "transformer.blocks.0.mixer.out_proj.weight": (256, 256),
        "transformer.blocks.0.cross_attn.Wq.weight": (256, 256),
        "transformer.blocks.0.cross_attn.Wkv.weight": (512, 256),
        "transformer.blocks.0.norm3.weight": (256,),
        "transformer.blocks.0.mlp.fc1.weight": (1024, 256),
        "transformer.norm.weight": (256,),
        "cell_transformer.blocks.5.mixer.Wqkv.weight": (768, 256),
        "cell_transformer.blocks.5.cross_attn.Wkv.weight": (512, 256),
        "cell_transformer.norm.weight": (256,),
        "expr_decoder.fc.0.weight": (256, 257),
        "expr_decoder.fc.5.weight": (256,),
        "expr_decoder.pred_var_zero.weight": (3, 256),
        "cls_decoders.cell_type_ontology_term_id.decoder.0.weight": (256, 64),
        "cls_decoders.cell_type_ontology_term_id.decoder.1.weight": (256,),
        "cls_decoders.sex_ontology_term_id.out_layer.weight": (2, 256),
        "compressor.cell_type_ontology_term_id.encoder.0.weight": (128, 256),
        "compressor.cell_type_ontology_term_id.encoder.4.weight": (64, 128),
        "compressor.cell_type_ontology_term_id.encoder.5.weight": (64,),
        "compressor.cell_type_ontology_term_id.fc_mu.weight": (64, 64),
        "compressor.cell_type_ontology_term_id.fc_var.weight": (64, 64),
        "compressor.cell_type_ontology_term_id.decoder.4.weight": (256, 128),
        "compressor.sex_ontology_term_id.project_in.weight": (2, 256),
        "compressor.sex_ontology_term_id.project_out.weight": (256, 2),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("transformer.blocks.8.") for k in sd)
    assert not any(k.startswith("cell_transformer.blocks.6.") for k in sd)


@pytest.mark.parametrize("preset", ["small", "medium"])
def test_checkpoint_round_trip_in_published_layout(preset, tmp_path):
    model = random_model(preset_config(preset), seed=3)
    path = save_checkpoint(model, tmp_path / f"{preset}.ckpt")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) >= {"state_dict", "hyper_parameters", "pytorch-lightning_version", "epoch", "global_step"}
    hp = raw["hyper_parameters"]
    assert hp["d_model"] == model.config.d_model and hp["expr_emb_style"] == "metacell"
    assert set(hp["genes"]) == set(model.config.organisms) and hp["precpt_gene_emb"] is None
    loaded = load_checkpoint(path)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert loaded.checkpoint_sha256 and len(loaded.checkpoint_sha256) == 64
    if preset == "medium":  # grouped-query attention: 8 query heads, 4 kv heads of 64
        assert tuple(loaded.state_dict()["transformer.blocks.15.mixer.Wqkv.weight"].shape) == (1024, 512)
        assert tuple(loaded.state_dict()["cell_transformer.blocks.0.cross_attn.Wkv.weight"].shape) == (512, 512)


def test_loader_renames_drops_and_reports_keys(tiny, tmp_path):
    path = save_checkpoint(tiny, tmp_path / "tiny.ckpt")
    ckpt = torch.load(path, weights_only=True)
    sd = ckpt["state_dict"]
    # upstream's older name for the frozen embedding, and heads we do not use
    sd["gene_encoder.0.embedding.weight"] = sd.pop("gene_encoder.0.embeddings.weight")
    sd["mvc_decoder.gene2query.weight"] = torch.zeros(2, 2)
    sd["grad_reverse_discriminator_loss.w"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "renamed.ckpt")
    loaded = load_checkpoint(tmp_path / "renamed.ckpt")
    inputs = random_inputs(tiny)
    assert torch.allclose(loaded(*inputs)["embs"], tiny(*inputs)["embs"])

    sd["transformer.blocks.0.extra.weight"] = torch.zeros(1)
    del sd["transformer.norm.bias"]
    torch.save(ckpt, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match=r"missing \['transformer.norm.bias'\].*transformer.blocks.0.extra"):
        load_checkpoint(tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "text.ckpt")


def test_checkpoint_with_foreign_classes_loads_without_importing_them(tiny, tmp_path, monkeypatch):
    module = types.ModuleType("upstream_only_module")

    class Foreign:
        def __init__(self):
            self.value = 41

    Foreign.__module__ = "upstream_only_module"
    Foreign.__qualname__ = "Foreign"
    module.Foreign = Foreign
    monkeypatch.setitem(sys.modules, "upstream_only_module", module)
    path = save_checkpoint(tiny, tmp_path / "tiny.ckpt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["optim_state"] = Foreign()
    torch.save(ckpt, tmp_path / "foreign.ckpt")
    monkeypatch.delitem(sys.modules, "upstream_only_module")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "foreign.ckpt", weights_only=True)
    loaded = load_checkpoint(tmp_path / "foreign.ckpt")
    assert "upstream_only_module" not in sys.modules
    assert type(read_checkpoint(tmp_path / "foreign.ckpt")["hyper_parameters"]["optim_state"]).__module__.startswith(
        "stand_in."
    )
    inputs = random_inputs(tiny)
    assert torch.allclose(loaded(*inputs)["embs"], tiny(*inputs)["embs"])


def test_outputs_of_a_cell_do_not_depend_on_its_batch(tiny):
    genes, counts, knn, dists = random_inputs(tiny, n_cells=8)
    together = tiny.predict(genes, counts, knn, dists)
    for i in (0, 5):
        alone = tiny.predict(genes[i : i + 1], counts[i : i + 1], knn[i : i + 1], dists[i : i + 1])
        assert torch.allclose(alone["embs"][0], together["embs"][i], atol=1e-5)
        assert torch.equal(alone["top_ids"][0], together["top_ids"][i])
    assert together["embs"].shape == (8, sum(w for _, w in tiny.config.embedding_blocks))
    # the embedding varies between cells (the network is not degenerate)
    assert together["embs"].std(0).mean() > 1e-2


def test_predict_reports_topk_ids_and_sigmoid_scores(tiny):
    genes, counts, knn, dists = random_inputs(tiny)
    out = tiny(genes, counts, knn, dists)
    pred = tiny.predict(genes, counts, knn, dists)
    col = 0
    for name, k in tiny.config.topk.items():
        logits = out["logits"][name]
        assert k == (1 if tiny.config.classes[name] <= 2 else 3)
        order = logits.argsort(1, descending=True)[:, :k]
        assert torch.equal(pred["top_ids"][:, col : col + k], order)
        assert torch.allclose(pred["top_scores"][:, col : col + k], torch.sigmoid(logits.gather(1, order)))
        col += k
    assert col == pred["top_ids"].shape[1] == 23


def test_bf16_autocast_is_close_to_fp32(tiny):
    inputs = random_inputs(tiny, n_cells=4)
    ref = tiny(*inputs)["embs"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = tiny(*inputs)["embs"]
    assert low.dtype == torch.float32
    cos = F.cosine_similarity(ref, low, dim=1)
    assert cos.min() > 0.99, cos


def test_grouped_query_attention_head_mapping_against_einsum():
    torch.manual_seed(0)
    dim, n_heads, n_kv = 32, 8, 2
    attn = SelfAttention(dim, n_heads, n_kv)
    x = torch.randn(3, 10, dim)
    hd = dim // n_heads
    qkv = x @ attn.Wqkv.weight.T + attn.Wqkv.bias
    q = qkv[..., : n_heads * hd].reshape(3, 10, n_heads, hd)
    k = qkv[..., n_heads * hd : (n_heads + n_kv) * hd].reshape(3, 10, n_kv, hd)
    v = qkv[..., (n_heads + n_kv) * hd :].reshape(3, 10, n_kv, hd)
    heads = []
    for j in range(n_heads):  # query head j reads kv head j // (H / Hkv)
        kv = j // (n_heads // n_kv)
        scores = torch.einsum("btd,bsd->bts", q[:, :, j], k[:, :, kv]) / math.sqrt(hd)
        heads.append(torch.einsum("bts,bsd->btd", scores.softmax(-1), v[:, :, kv]))
    expected = torch.cat(heads, -1) @ attn.out_proj.weight.T + attn.out_proj.bias
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_one_block_against_a_direct_computation():
    torch.manual_seed(1)
    dim, cross_dim = 16, 24
    block = Block(dim, n_heads=4, n_kv_heads=4, cross_dim=cross_dim)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, kv = torch.randn(2, 5, dim), torch.randn(2, 7, cross_dim)

    def ln(t, norm):
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-6) * norm.weight + norm.bias

    def mha(q, k, v, heads=4):
        B, Lq, _ = q.shape
        q, k, v = (t.reshape(B, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        w = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        return (w @ v).transpose(1, 2).reshape(B, Lq, -1)

    lin = lambda t, layer: t @ layer.weight.T + layer.bias  # noqa: E731
    ca = block.cross_attn
    h = ln(x, block.norm1)
    kvp = lin(kv, ca.Wkv)
    r = x + lin(mha(lin(h, ca.Wq), kvp[..., :dim], kvp[..., dim:]), ca.out_proj)
    h = ln(r, block.norm3)
    qkv = lin(h, block.mixer.Wqkv)
    r = r + lin(mha(qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]), block.mixer.out_proj)
    h = ln(r, block.norm2)
    gelu = 0.5 * lin(h, block.mlp.fc1) * (1 + torch.erf(lin(h, block.mlp.fc1) / math.sqrt(2)))
    expected = r + lin(gelu, block.mlp.fc2)
    assert torch.allclose(block(x, kv), expected, atol=1e-4)
    # without keys/values the cross-attention sub-layer is skipped and norm1 feeds self-attention
    h = ln(x, block.norm1)
    qkv = lin(h, block.mixer.Wqkv)
    r = x + lin(mha(qkv[..., :dim], qkv[..., dim : 2 * dim], qkv[..., 2 * dim :]), block.mixer.out_proj)
    h = ln(r, block.norm2)
    gelu = 0.5 * lin(h, block.mlp.fc1) * (1 + torch.erf(lin(h, block.mlp.fc1) / math.sqrt(2)))
    assert torch.allclose(block(x, None), r + lin(gelu, block.mlp.fc2), atol=1e-4)


def test_flops_per_cell_of_medium_at_3200():
    flops = preset_config("medium").flops_per_cell(3200)
    assert 6e11 <= flops <= 7e11


def test_build_model_warns_about_random_weights_and_is_deterministic():
    with pytest.warns(UserWarning, match="random weights"):
        a = build_model("tiny", seed=5)
    with pytest.warns(UserWarning):
        b = build_model("tiny", seed=5)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("huge")


def test_scprint1_style_checkpoint_loads(tmp_path):
    """No cell transformer, class tokens prepended to the genes, continuous expression encoder, flat gene list."""
    config = scprint1_style_config()
    model = random_model(config, seed=2)
    assert "cell_transformer.norm.weight" not in model.state_dict()
    assert tuple(model.state_dict()["class_encoder.embedding.weight"].shape) == (10, 32)
    path = save_checkpoint(model, tmp_path / "v1.ckpt")
    ckpt = torch.load(path, weights_only=True)
    hp = ckpt["hyper_parameters"]
    hp["genes"] = [g for o in ["NCBITaxon:9606", "NCBITaxon:10090"] for g in hp["genes"][o]]  # one flat list
    hp["label_counts"], hp["classes"] = dict(hp["classes"]), list(hp["classes"])
    for key in ("normalization", "cell_specific_blocks", "expr_emb_style", "num_heads_kv"):
        del hp[key]  # absent from scPRINT-1 hyper-parameters; their defaults apply
    hp["expr_emb_style"] = "continuous"
    torch.save(ckpt, tmp_path / "v1-legacy.ckpt")
    loaded = load_checkpoint(tmp_path / "v1-legacy.ckpt")
    assert loaded.config.normalization == "sum" and not loaded.config.cell_specific_blocks
    genes, counts, _, _ = random_inputs(model)
    expected = model.predict(genes, counts)
    got = loaded.predict(genes, counts)
    assert torch.allclose(expected["embs"], got["embs"], atol=1e-6)
    assert expected["embs"].shape[1] == 32 * 10  # no compressor: one full-width block per token
