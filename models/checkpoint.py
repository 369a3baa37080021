"""Read and write scPRINT-2 checkpoints in the published (Lightning) layout.

A published checkpoint (``small-v2.ckpt``, ``v2-medium.ckpt``, scPRINT-1's
``medium.ckpt``...) is a pickled dict with ``hyper_parameters`` (every argument
of upstream's ``scPRINT2.__init__``) and ``state_dict``. We read it without
importing upstream: ``torch.load(weights_only=True)`` first, and where the file
holds other Python objects, an unpickler that never imports anything outside a
short allow-list and replaces every other class by an inert stand-in.

All differences between upstream key names and ours are in :data:`RENAMES` and
:data:`UNUSED_PREFIXES`; after them the state_dict must match the network
exactly, and any missing or unexpected key is reported by name.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import torch

from models.network import ScPrint2, ScPrint2Config

# Older upstream versions named the gene embedding `embedding`, newer `embeddings`.
RENAMES = [
    (re.compile(r"^gene_encoder\.(0\.)?embedding\.weight$"), r"gene_encoder.\1embeddings.weight"),
]
# Parts of upstream that play no role in embeddings or labels; dropped on load.
UNUSED_PREFIXES = (
    "grad_reverse_discriminator_loss.",
    "mvc_decoder.",
    "splicing_head.",
    "adv_assay_decoder.",
    "adv_organism_decoder.",
)
# Upstream constructor arguments that we do not model, written with upstream's defaults.
_UPSTREAM_DEFAULTS = {
    "precpt_gene_emb": None,
    "memmap_gene_emb": False,
    "freeze_embeddings": True,
    "gene_pos_file": None,
    "attn_bias": None,
    "attention": "normal",
    "n_input_bins": 0,
    "mvc_decoder": None,
    "pred_embedding": None,
    "splicing_head": False,
    "do_adv_cls": False,
    "lr": 1e-4,
    "nb_features": None,
    "sketcher_size": 200,
    "feature_redraw_interval": None,
    "drop_path_rate": 0.0,
}
_CONFIG_KEYS = [
    "genes", "organisms", "classes", "label_decoders", "labels_hierarchy", "compress_class_dim",
    "d_model", "nhead", "num_heads_kv", "nlayers", "cell_specific_blocks", "d_model_cell", "nhead_cell",
    "num_heads_kv_cell", "nlayers_cell", "expr_emb_style", "expr_encoder_layers", "normalization",
    "finetune_gene_emb", "layers_cls", "zinb", "use_metacell_token", "dropout",
]  # fmt: skip


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded; the message names the file and the problem."""


# ----------------------------------------------------------------------------- unpickling


class _StandIn:
    """Replaces any class a checkpoint names that is not on the allow-list; keeps its state."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


# What a Lightning checkpoint legitimately needs to rebuild tensors, containers and numpy values.
_ALLOWED = {
    "builtins": {"dict", "list", "set", "frozenset", "tuple", "int", "float", "str", "bytes", "bool", "complex",
                 "slice", "range", "object"},
    "collections": {"OrderedDict", "defaultdict", "Counter"},
    "torch._utils": {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"},
    "torch": {"Size", "device", "dtype", "float32", "float16", "bfloat16", "float64", "int64", "int32", "bool",
              "FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage", "IntStorage",
              "BoolStorage", "ByteStorage"},
    "torch.storage": {"UntypedStorage", "TypedStorage"},
    "numpy": {"dtype", "ndarray"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy.dtypes": None,  # dtype classes only
    "_codecs": {"encode"},
}  # fmt: skip


class _RestrictedUnpickler(pickle.Unpickler):
    """Imports only what :data:`_ALLOWED` names; every other class becomes an inert :class:`_StandIn`."""

    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get(module, set())
        if allowed is None or name in allowed:
            return super().find_class(module, name)
        return type(name, (_StandIn,), {"__module__": "stand_in." + module})


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an Unpickler and ``load``."""

    Unpickler = _RestrictedUnpickler
    __name__ = "restricted_pickle"

    @staticmethod
    def load(file, **kwargs):
        return _RestrictedUnpickler(file, **kwargs).load()


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict, read without importing upstream code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickleModule)
        except Exception as err:  # noqa: BLE001 - any failure here is a bad file
            raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(err).__name__}: {err})") from err
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"{path}: not a scPRINT checkpoint (expected 'state_dict' and 'hyper_parameters')")
    return ckpt


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- hparams -> config


def _split_gene_list(genes: list[str], organisms: list[str]) -> dict[str, list[str]]:
    """Old checkpoints store one flat gene list: split it by Ensembl prefix."""
    prefixes = {"NCBITaxon:9606": "ENSG0", "NCBITaxon:10090": "ENSMUSG"}
    out = {}
    for org in organisms:
        if org not in prefixes:
            raise CheckpointError(f"flat gene list with organism {org}: cannot tell its genes apart")
        out[org] = [g for g in genes if g.startswith(prefixes[org])]
    if sum(map(len, out.values())) != len(genes):
        raise CheckpointError("flat gene list holds genes of organisms not in 'organisms'")
    return out


def config_from_checkpoint(ckpt: dict) -> ScPrint2Config:
    """Build the network configuration from ``hyper_parameters`` and the state_dict shapes."""
    hp, sd = dict(ckpt["hyper_parameters"]), ckpt["state_dict"]
    if hp.get("memmap_gene_emb") and not any(k.endswith("embeddings.weight") for k in sd):
        raise CheckpointError("gene embeddings were memory-mapped at training time and are not in the state_dict")
    organisms = list(hp.get("organisms") or ["NCBITaxon:9606", "NCBITaxon:10090"])
    genes = hp["genes"]
    genes = {o: list(genes[o]) for o in organisms} if isinstance(genes, dict) else _split_gene_list(genes, organisms)
    classes = hp.get("classes") or {}
    if isinstance(classes, list):  # legacy: names in `classes`, sizes in `label_counts`
        classes = {c: hp["label_counts"][c] for c in classes}
    # upstream resizes each head to the checkpoint's out_layer; so do we
    classes = {c: int(sd.get(f"cls_decoders.{c}.out_layer.bias", torch.empty(n)).shape[0]) for c, n in classes.items()}
    values = {k: hp[k] for k in _CONFIG_KEYS if k in hp}
    values.update(
        genes=genes,
        organisms=organisms,
        classes=classes,
        label_decoders={c: {int(code): term for code, term in hp["label_decoders"][c].items()} for c in classes},
        labels_hierarchy={
            c: {int(p): list(ch) for p, ch in v.items()} for c, v in (hp.get("labels_hierarchy") or {}).items()
        },
        normalization=hp.get("normalization", "sum"),
        layers_cls=list(hp.get("layers_cls") or []),
        has_pos_encoder="pos_encoder.pe" in sd,
    )
    values.setdefault("expr_emb_style", "continuous")
    values.setdefault("cell_specific_blocks", False)
    if not values["cell_specific_blocks"]:  # scPRINT-1 style: cell tokens live in the main transformer
        values.setdefault("num_heads_kv", values.get("nhead", 4))
    return ScPrint2Config(**values)


def hyper_parameters(config: ScPrint2Config) -> dict:
    """Upstream-style ``hyper_parameters`` for a configuration (what a published checkpoint stores)."""
    hp = dict(_UPSTREAM_DEFAULTS)
    hp.update({k: getattr(config, k) for k in _CONFIG_KEYS})
    hp["label_decoders"] = {c: dict(v) for c, v in config.label_decoders.items()}
    return hp


# ----------------------------------------------------------------------------- load / save


def upstream_to_ours(state_dict: dict) -> dict:
    """Apply :data:`RENAMES` and drop :data:`UNUSED_PREFIXES`."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(UNUSED_PREFIXES):
            continue
        for pattern, repl in RENAMES:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def load_checkpoint(path: str | Path) -> ScPrint2:
    """Load a published scPRINT-2 (or scPRINT-1) checkpoint into :class:`ScPrint2`, strictly.

    Returns the network in ``eval()`` mode, fp32, on CPU, with ``model.checkpoint_path``
    and ``model.checkpoint_sha256`` set.
    """
    ckpt = read_checkpoint(path)
    try:
        config = config_from_checkpoint(ckpt)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: hyper_parameters are incomplete or malformed ({err!r})") from err
    model = ScPrint2(config)
    state = upstream_to_ours(ckpt["state_dict"])
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(ours[k].shape)}" for k in ours.keys() & state.keys()
             if tuple(state[k].shape) != tuple(ours[k].shape)]  # fmt: skip
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: state_dict does not match the network: missing {missing}, unexpected {unexpected}, "
            f"shape mismatch {wrong}"
        )
    model.load_state_dict(state, strict=True)
    model.checkpoint_path = str(path)
    model.checkpoint_sha256 = file_sha256(path)
    return model.eval()


def save_checkpoint(model: ScPrint2, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a published-layout Lightning checkpoint (atomically).

    ``dtype`` (e.g. ``torch.float16``) stores the floating-point tensors in that
    type, to make the file smaller; :func:`load_checkpoint` copies them into the
    float32 network.
    """
    path = Path(path)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    ckpt = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": state,
        "hyper_parameters": hyper_parameters(model.config),
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return path
