"""How much each tensor matters: the KL divergence from the full-precision model when one tensor is stored in one
ggml type and every other tensor stays in full precision, measured on calibration tokens.

    measure_sensitivity(ckpt, tokens, ggml_candidates(types, importance), units, cache, identity) -> table

For each unit (one tensor for GGUF — the embedding and lm_head included; a fused group such as q/k/v for the
integer formats) and each candidate that can store it, the unit's tensors are encoded as the run will encode them,
read back, put in place of the originals, and the model is run from the first layer that sees it: the inputs of every
layer and the final hidden states of the full-precision model are kept, so a tensor of layer i costs layers i.. plus
the head. The value is the mean over tokens of KL(p_full || p_quantized), in nats.

How a candidate encodes: for a data-free run, ggml types as `gguf.codec.encode` with the tensor's imatrix entry
where it has one, integer presets round-to-nearest; for a GPTQ run (`gptq=` options), GPTQ onto the candidate with
the Hessian of the tensor's input in the full-precision model (`gguf.grids.gptq_round`, as the pipeline rounds;
lm_head's KL-weighted per row cluster, `quant/head_hessian.py`), so the prediction credits what GPTQ recovers. The
Hessians come from other windows than the measured ones, as many as the run calibrates on: a written file is used
on text it was not calibrated on. The embedding, a lookup without an input, is rounded by GPTQ on the Fisher
information of the output with respect to its output (`quant/fisher.py`), measured once and kept beside the table
(`embedding_hessian_path`) for the run that writes the allocation — when the tokens are enough to estimate it
(`fisher.enough_samples`; else its data-free encoding, as the run then writes it).

With `activation_types`, each matrix's input is also measured rounded the way llama.cpp's CPU backend rounds a
product's activations (`gguf.activations`: Q8_K blocks for the k- and i-quants, Q8_0 / Q8_1 for the legacy types),
the weight kept in full precision: a penalty per (tensor, vec_dot_type) that adds to every candidate of that
vec_dot_type. On mistral-nano the rounding of down_proj's input costs more than its Q6_K weight; measuring it lets
the allocation prefer a type with finer activation blocks where that pays (the embedding, a row lookup, has none).

The table is saved after every tensor (an atomic rewrite of one JSON file), so an interrupted measurement resumes
and several byte budgets cost one measurement. A file made for another model, other tokens or another imatrix is
refused (its `identity` differs).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from quantkit.errors import QuantkitError
from quantkit.ggml_types import IMPORTANCE_TYPES, block_size
from quantkit.io import atomic_cache_file, read_json_object
from quantkit.model.arch import EMBEDDING
from quantkit.tensors import all_finite

if TYPE_CHECKING:
    from quantkit.quant.gptq import GPTQ

CHUNK_TOKENS = 512  # tokens whose full-vocabulary log-probabilities are held at once
FILE_VERSION = 1


@dataclass
class SensitivityTable:
    identity: dict[str, Any]
    kld: dict[str, dict[str, float]] = field(default_factory=dict)  # tensor -> type -> mean KLD (nats/token)
    # tensor -> vec_dot_type -> mean KLD of the full-precision model with only that tensor's input so rounded
    activation: dict[str, dict[str, float]] = field(default_factory=dict)
    measured: int = 0  # (unit, candidate) pairs `measure_sensitivity` added (not saved)
    embedding_hessian: Path | None = None  # GPTQ measurements: the embedding's Fisher matrix (a file beside it)

    def to_dict(self) -> dict[str, Any]:
        return {"version": FILE_VERSION, "identity": self.identity, "kld": self.kld, "activation": self.activation}

    @classmethod
    def load(cls, path: Path, identity: dict[str, Any]) -> SensitivityTable:
        """The table saved at `path` (empty when there is none); QuantkitError when it was made for something else."""
        if not path.exists():
            return cls(identity)
        obj = read_json_object(path, QuantkitError)
        if obj.get("version") != FILE_VERSION or obj.get("identity") != identity:
            raise QuantkitError(f"{path}: sensitivity table of another model, calibration or imatrix "
                                f"(saved identity {obj.get('identity')}, this run {identity}); remove it or name "
                                "another file")
        fields = {}
        for key in ("kld", "activation"):
            value = obj.get(key, {} if key == "activation" else None)  # tables saved before penalties lack it
            if not isinstance(value, dict) or not all(
                    isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values())
                    for v in value.values()):
                raise QuantkitError(f"{path}: field {key!r} must map tensor names to {{type: number}}")
            fields[key] = {k: {t: float(x) for t, x in v.items()} for k, v in value.items()}
        return cls(identity, **fields)

    def save(self, path: Path) -> None:
        """Write (or replace: `load` accepted it as this table's file) atomically."""
        with atomic_cache_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")


def embedding_hessian_path(cache: Path) -> Path:
    """Where a GPTQ measurement keeps the embedding's Fisher matrix: beside its table."""
    return cache.with_name(cache.stem + ".embedding-fisher.safetensors")


def _identity_text(identity: dict[str, Any]) -> str:
    return json.dumps(identity, sort_keys=True)


def load_embedding_hessian(path: Path, identity: dict[str, Any] | None = None) -> torch.Tensor:
    """The Fisher matrix saved at `path` (with `identity`: only if made for it); QuantkitError otherwise."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            saved = (f.metadata() or {}).get("identity")
            fisher = f.get_tensor("fisher")
    except (OSError, SafetensorError) as e:
        raise QuantkitError(f"{path}: cannot read the embedding's Fisher matrix ({e})") from None
    if identity is not None and saved != _identity_text(identity):
        raise QuantkitError(f"{path}: Fisher matrix of another model or calibration (saved identity {saved}); remove "
                            "it beside its table")
    if fisher.dim() != 2 or fisher.shape[0] != fisher.shape[1] or not all_finite(fisher):
        raise QuantkitError(f"{path}: field 'fisher' must be a finite square matrix, got shape {list(fisher.shape)}")
    return fisher.float()


class _Reference:
    """The full-precision model's layer inputs, final hidden states and (chunked) log-probabilities."""

    def __init__(self, model, tokens: torch.Tensor):
        self.model, self.tokens = model, tokens
        t = tokens.shape[1]
        self.positions = torch.arange(t)
        self.rope = model.rope(self.positions, torch.float32)
        self.mask = model.mask(self.positions, t)
        with torch.no_grad():
            h = model.embed(tokens)
            self.layer_inputs = []
            for layer in model.model.layers:
                self.layer_inputs.append(h)
                h = layer(h, self.positions, self.rope, self.mask)
            self.final = h
            self.logp = [torch.log_softmax(model.head(x).float(), dim=-1) for x in self._chunks(h)]

    def kld(self, hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """Mean KL(full || q) over the tokens, q = softmax(head(hidden)) chunk by chunk: sum p (log p - log q)
        per token, the difference taken element by element and summed in float64 (a KLD of 1e-5 is a small
        difference of two sums of order 1e3)."""
        total, n = 0.0, 0
        for logp, x in zip(self.logp, self._chunks(hidden)):
            logq = torch.log_softmax(head(x).float(), dim=-1)
            total += float((logp.exp() * (logp - logq)).sum(dtype=torch.float64))
            n += x.shape[0]
        return total / n

    def _chunks(self, h: torch.Tensor) -> list[torch.Tensor]:
        flat = h.reshape(-1, h.shape[-1])
        return list(flat.split(CHUNK_TOKENS))

    def kld_from_layer(self, first: int) -> float:
        """Mean KL(full || current model) when the model's weights from layer `first` on (or the embedding:
        first = -1; only the head: first = n_layers) may differ from the full-precision ones."""
        model = self.model
        with torch.no_grad():
            if first < 0:
                h, first = model.embed(self.tokens), 0
            elif first < len(model.model.layers):
                h = self.layer_inputs[first]
            else:
                h = self.final
            for layer in model.model.layers[first:]:
                h = layer(h, self.positions, self.rope, self.mask)
            return self.kld(h, model.head)


def model_kld(ckpt, tokens: torch.Tensor, other) -> float:
    """Mean KL(full-precision `ckpt` || `other`) on `tokens` [n, seqlen]; `other` is a loaded model (e.g. a written
    GGUF through `runtime.model.load_model`), compared token by token in chunks."""
    from quantkit.model.reference import Transformer

    ref = _Reference(Transformer.from_checkpoint(ckpt, torch.float32), tokens)
    t = tokens.shape[1]
    with torch.no_grad():
        return ref.kld(other.hidden_states(tokens, torch.arange(t), t), other.lm_head)


def _first_layer(name: str, n_layers: int) -> int:
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    if name == EMBEDDING:
        return -1
    return n_layers  # lm_head


# a candidate: (tensor name, full-precision weight, the Hessian of its input as a GPTQ object, or None) -> the weight
# as stored and read back, or None when the candidate cannot store that tensor (its block or group does not divide
# the rows)
Encoder = Callable[[str, torch.Tensor, "GPTQ | None"], "torch.Tensor | None"]


def ggml_candidates(types: Iterable[str], importance: dict[str, torch.Tensor],
                    gptq: dict[str, Any] | None = None) -> dict[str, Encoder]:
    """One encoder per ggml type: the GGUF writer's encoding (with the tensor's imatrix entry), dequantized; with
    `gptq` (options of `GPTQ.quantize`), GPTQ onto the type for every tensor that has an input Hessian."""
    from quantkit.gguf.codec import encode
    from quantkit.gguf.grids import gptq_round

    def make(type_name: str) -> Encoder:
        def fn(name: str, w: torch.Tensor, hessian) -> torch.Tensor | None:
            if w.shape[-1] % block_size(type_name):
                return None
            if gptq is not None and hessian is not None:
                return gptq_round(hessian, w, type_name, name, **gptq)[0].dequantize(torch.float32)
            if type_name in IMPORTANCE_TYPES and name not in importance:  # ggml encodes these only with an imatrix
                return None
            return encode(w, type_name, importance.get(name), name=name).dequantize(torch.float32)
        return fn

    return {t: make(t) for t in types}


def scheme_candidates(schemes: dict[str, Any], gptq: dict[str, Any] | None = None) -> dict[str, Encoder]:
    """One encoder per integer scheme (label -> `Scheme`): round to nearest, dequantized; with `gptq` (options of
    `GPTQ.quantize`), GPTQ onto the scheme."""
    from quantkit.gguf.grids import gptq_round
    from quantkit.quant.rtn import quantize_rtn

    def make(scheme) -> Encoder:
        def fn(name: str, w: torch.Tensor, hessian) -> torch.Tensor | None:
            if w.shape[-1] % scheme.effective_group_size(w.shape[-1]):
                return None
            if gptq is not None and hessian is not None:
                return gptq_round(hessian, w, scheme, name, **gptq)[0].dequantize().float()
            return quantize_rtn(w, scheme).dequantize().float()
        return fn

    return {label: make(s) for label, s in schemes.items()}


class _InputHessians:
    """The Hessian of each linear's input in the full-precision model on `tokens`, as GPTQ objects (one shared by
    the linears that read the same input; lm_head's the KL-weighted ones of `head_clusters` row clusters), collected
    one layer (or the head) at a time: only the current layer's input is held, so the tokens may be as many as a
    run's calibration."""

    def __init__(self, model, tokens: torch.Tensor, embedding: torch.Tensor | None, head_clusters: int = 1):
        from quantkit.quant.fisher import embedding_gptq

        self.model, self.tokens, self.head_clusters = model, tokens, head_clusters
        self.n_layers = len(model.model.layers)
        t = tokens.shape[1]
        self.positions = torch.arange(t)
        self.rope, self.mask = model.rope(self.positions, torch.float32), model.mask(self.positions, t)
        self.hidden, self.next_layer = None, 0  # the input of layer `next_layer`
        self.first: int | None = None
        self.by_name: dict[str, GPTQ] = {}
        # the embedding's Fisher matrix stands for its input's Hessian
        self.embedding = None if embedding is None else embedding_gptq(embedding)

    def get(self, name: str) -> GPTQ | None:
        first = _first_layer(name, self.n_layers)
        if first < 0:
            return self.embedding
        if first != self.first:
            self.by_name = {}  # the previous layer's Hessians are freed before the next ones are collected
            self.by_name, self.first = self._collect(first), first
        return self.by_name.get(name)

    def _run_layer(self) -> None:
        layer = self.model.model.layers[self.next_layer]
        self.hidden = layer(self.hidden, self.positions, self.rope, self.mask)
        self.next_layer += 1

    def _collect(self, first: int) -> dict[str, GPTQ]:
        from quantkit.model import arch
        from quantkit.quant.gptq import GPTQ
        from quantkit.quant.head_hessian import HeadHessians

        model = self.model
        with torch.no_grad():
            if self.hidden is None or first < self.next_layer:
                self.hidden, self.next_layer = model.embed(self.tokens), 0
            while self.next_layer < first:
                self._run_layer()
            if first == self.n_layers:
                head = HeadHessians(model.lm_head.weight.data, self.head_clusters)
                for x in self.hidden.reshape(-1, self.hidden.shape[-1]).split(CHUNK_TOKENS):
                    head.add_batch(model.model.norm(x))
                return {"lm_head.weight": head}
            layer, prefix = model.model.layers[first], arch.layer_prefix(first)
            modules = dict(layer.named_modules())
            found, handles = {}, []
            for group in arch.LINEAR_GROUPS:
                gptq = GPTQ(modules[group[0]].in_features, name=f"{prefix}{group[0]}")
                handles.append(modules[group[0]].register_forward_pre_hook(
                    lambda _module, args, g=gptq: g.add_batch(args[0])))
                found.update({f"{prefix}{local}.weight": gptq for local in group})
            try:
                self._run_layer()
            finally:
                for h in handles:
                    h.remove()
            return found


def measure_sensitivity(ckpt, tokens: torch.Tensor, candidates: dict[str, Encoder], units: dict[str, list[str]],
                        cache: Path, identity: dict[str, Any],
                        progress: Callable[[Iterable], Iterable] | None = None,
                        hessians: bool = False, head_clusters: int = 1,
                        hessian_tokens: torch.Tensor | None = None,
                        activation_types: Iterable[str] = ()) -> SensitivityTable:
    """The sensitivity of every unit (a group of tensors that is stored alike, e.g. one tensor, or q/k/v of a
    layer) to every candidate that can store all its tensors, on `tokens` [n, seqlen]; measurements already in
    `cache` are reused, new ones are added to it. Keys of the table: unit names, then candidate labels.
    `hessians`: hand each encoder the Hessian of its tensor's input (for candidates that round with GPTQ); lm_head's
    are the KL-weighted Hessians of `head_clusters` row clusters (`quant.head_hessian`). They are collected on
    `hessian_tokens` (default `tokens`): other windows than the measured ones keep GPTQ's gain out of sample, as a
    written file's is on text other than its calibration (in sample it is overestimated by up to a third); as many
    as the run calibrates on, so that the rounding is as good as the run's. The embedding's Fisher matrix comes from
    as many of their tokens as `tokens` has (one backward pass per draw and window). `activation_types`: also the
    penalty of rounding each unit's matrix input to each of these vec_dot_types (`table.activation`; F32 rounds
    nothing)."""
    from quantkit.model.reference import Transformer
    from quantkit.quant.fisher import embedding_fisher, enough_samples

    table = SensitivityTable.load(cache, identity)
    rounded = [t for t in dict.fromkeys(activation_types) if t != "F32"]
    todo = [u for u in units if any(c not in table.kld.get(u, {}) for c in candidates)
            or (_matrix_input(units[u], ckpt.config.tie_word_embeddings)
                and any(t not in table.activation.get(u, {}) for t in rounded))]
    fisher_path = embedding_hessian_path(cache)
    seen_tokens = tokens if hessian_tokens is None else hessian_tokens
    fisher_tokens = seen_tokens[:tokens.shape[0], :tokens.shape[1]]
    wants_fisher = (hessians and any(EMBEDDING in names for names in units.values())
                    and enough_samples(int(fisher_tokens.numel()), ckpt.config.hidden_size))
    fisher = load_embedding_hessian(fisher_path, identity) if wants_fisher and fisher_path.exists() else None
    table.embedding_hessian = fisher_path if fisher is not None else None
    if not todo and (fisher is not None or not wants_fisher):
        return table
    model = Transformer.from_checkpoint(ckpt, torch.float32)
    if wants_fisher and fisher is None:
        fisher = embedding_fisher(model, fisher_tokens)
        with atomic_cache_file(fisher_path) as tmp:
            save_file({"fisher": fisher.contiguous()}, str(tmp), metadata={"identity": _identity_text(identity)})
        table.embedding_hessian = fisher_path
    tied = ckpt.config.tie_word_embeddings
    ref = _Reference(model, tokens)
    n_layers = ckpt.config.num_hidden_layers
    inputs = _InputHessians(model, seen_tokens, fisher, head_clusters) if hessians else None
    for unit in (progress(todo) if progress else todo):
        names = units[unit]
        params = {n: [model.get_parameter(n)] for n in names}
        if tied and EMBEDDING in params:
            params[EMBEDDING].append(model.get_parameter("lm_head.weight"))
        originals = {n: ps[0].data for n, ps in params.items()}
        first = min(_first_layer(n, n_layers) for n in names)
        row = table.kld.setdefault(unit, {})
        for label, encoder in candidates.items():
            if label in row:
                continue
            stored = {n: encoder(n, originals[n], inputs and inputs.get(n)) for n in names}
            if any(q is None for q in stored.values()):
                continue
            try:
                for n, ps in params.items():
                    for prm in ps:
                        prm.data = stored[n]
                row[label] = ref.kld_from_layer(first)
                table.measured += 1
            finally:
                for n, ps in params.items():
                    for prm in ps:
                        prm.data = originals[n]
        module = _matrix_input(names, tied)
        if module:
            penalties = table.activation.setdefault(unit, {})
            for vec_dot_type in rounded:
                if vec_dot_type not in penalties:
                    penalties[vec_dot_type] = _rounded_input_kld(ref, model.get_submodule(module), vec_dot_type,
                                                                 _first_layer(f"{module}.weight", n_layers))
        table.save(cache)
    return table


def _matrix_input(names: list[str], tied: bool) -> str | None:
    """The module whose input a one-tensor unit multiplies (None: several tensors, or the untied embedding, which
    is looked up, not multiplied)."""
    if len(names) != 1:
        return None
    if names[0] == EMBEDDING:
        return "lm_head" if tied else None
    return names[0].removesuffix(".weight")


def _rounded_input_kld(ref: _Reference, module: torch.nn.Module, vec_dot_type: str, first: int) -> float:
    """KL(full || full with `module`'s input rounded to `vec_dot_type`), running from layer `first`."""
    from quantkit.gguf.activations import round_input

    handle = round_input(module, vec_dot_type)
    try:
        return ref.kld_from_layer(first)
    finally:
        handle.remove()
