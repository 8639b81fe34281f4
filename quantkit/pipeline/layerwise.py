"""The layer-wise quantization pipeline: one decoder layer in memory at a time, resumable.

    embeddings -> for each decoder layer i:
        load only layer i (Checkpoint.layer_tensors), check every weight is finite
        [awq]  search and fold the activation-aware scales (quant/awq.py)
        for each linear group in true-sequential order (q/k/v, o, gate/up, down):
            run the calibration activations through the (partly quantized) layer up to the group's input,
            accumulate the GPTQ Hessian and the imatrix (Σ x² per input channel, count)
            quantize the group's linears (rtn | gptq) and put the dequantized weights back into the layer
        recompute the layer's outputs with the quantized weights: the next layer's inputs
        checkpoint (activations + finished tensors) into the work dir, hand the tensors to the writers, free it
    -> final norm, lm_head -> writers.finish()

Targets per tensor: a Scheme (QuantTensor), a ggml type name (GGMLTensor; float types are passed through as float
tensors for the writer to cast) or None (float tensor in the source dtype). RTN without ggml targets needs no
calibration and runs no forward pass at all.

Resume: the work dir holds `state.json` (fingerprint + completed layers), `acts.safetensors` (the inputs of the
next layer), `embed.safetensors` and `layer-NNNNN.safetensors` (finished tensors, imatrix, log rows). A run
with the same fingerprint (source, targets, options, calibration tokens, quantkit version) continues after the
last completed layer and replays the finished tensors to the writers, so the output is byte-identical to an
uninterrupted run. The work dir is removed after a successful finish, and after a failure a resume cannot get past
(`resumable`); after an interruption or a write fault it stays when it holds completed layers.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from quantkit import __version__
from quantkit.errors import CalibrationError, SchemeError, WriteError
from quantkit.ggml_types import is_block_type, is_float_type
from quantkit.gguf.grids import gptq_round
from quantkit.io import write_error
from quantkit.model import arch
from quantkit.model.arch import EMBEDDING
from quantkit.model.reference import DecoderLayer, sequence_inputs
from quantkit.pipeline.plan import COMPUTE_DTYPES, Target, target_label
from quantkit.pipeline.workdir import WORK_VERSION, WorkDir
from quantkit.quant import awq
from quantkit.quant.rtn import quantize_rtn, sqnr_db
from quantkit.quant.scheme import Scheme
from quantkit.tensors import GGMLTensor, QuantTensor, check_finite

# callables(layer_index) run after each layer is checkpointed and written (tests use it to kill a run mid-way)
LAYER_DONE_HOOKS: list[Callable[[int], None]] = []


@dataclass
class PipelineOptions:
    method: str = "rtn"  # rtn | gptq | awq
    damp: float = 0.1
    block_size: int = 128
    static_groups: bool = True
    group_aware: bool = True  # GPTQ without act-order: groups, and each group's columns, by importance
    head_clusters: int = 1  # GPTQ of lm_head: KL-weighted Hessians of this many row clusters (quant/head_hessian)
    refine_sweeps: int = 0  # GPTQ: sweeps of coordinate descent on the codes afterwards (quant/gptq.refine_codes)
    device: str = "cpu"
    compute_dtype: str = "float32"  # GPTQ's calibration forwards and Hessian products, AWQ's scale search forwards
    batch_size: int = 8  # calibration samples per forward pass
    collect_imatrix: bool = False  # also collect Σx² for every linear (saved for GGUF / returned)
    importance_for_ggml: bool = True  # use the collected imatrix when encoding ggml types with rtn

    def fingerprint_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("device")  # results do not depend on where they were computed... within fp noise
        d.pop("batch_size")
        return d


# AWQ's scale search ranks its 20 candidates on every 4th calibration sample and scores the best 3 (and ratio 0) on
# all of them (awq.search_scale): ~2.2x fewer module forwards than scoring all 20 on all samples
AWQ_RANK_EVERY = 4


@dataclass
class Companion:
    """A second set of targets quantized from the same calibration as the first (GGUF types beside integer
    formats), handed to its own writer. The first set's weights drive the layer's forward; each companion tensor
    is quantized from the same unquantized weight and Hessian as the first set's."""

    name: str  # what log rows of it say under "output", e.g. "gguf"
    targets: dict[str, Target]
    writer: Any


@dataclass
class PipelineResult:
    outputs: list[Path]
    log: list[dict[str, Any]]
    imatrix: dict[str, tuple[torch.Tensor, int]]  # module weight name -> (Σ x² [in], token count)
    resumed_from_layer: int
    seconds: float
    fingerprint: str
    calibration: dict[str, Any] = field(default_factory=dict)


# ---- helpers ----

def _target_fingerprint(target: Target) -> Any:
    if isinstance(target, Scheme):
        return target.to_dict()
    return target


def run_fingerprint(ckpt, targets: dict[str, Target], options: PipelineOptions, calib_sha: str | None,
                    companion_targets: dict[str, Target] | None = None) -> str:
    payload = {"source": ckpt.fingerprint(), "targets": {k: _target_fingerprint(v) for k, v in targets.items()},
               **({"companion": {k: _target_fingerprint(v) for k, v in companion_targets.items()}}
                  if companion_targets else {}),
               "options": options.fingerprint_dict(), "calibration": calib_sha, "version": __version__,
               "work_version": WORK_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def encode_ggml(weight: torch.Tensor, type_name: str, importance: torch.Tensor | None) -> GGMLTensor:
    from quantkit.gguf import codec

    imp = None if importance is None else importance.float().cpu()
    return codec.encode(weight.float().cpu(), type_name, imp)


def _dequant(t) -> torch.Tensor:
    return t.dequantize(torch.float32)


class _StopForward(Exception):
    pass


class _Collector:
    """Forward pre-hook on a linear: accumulate GPTQ Hessian / imatrix from its input, optionally stop there."""

    def __init__(self, gptq=None, imatrix: bool = False, stop: bool = False):
        self.gptq = gptq
        self.imatrix = imatrix
        self.stop = stop
        self.sum_sq: torch.Tensor | None = None
        self.count = 0

    def __call__(self, module, args):
        x = args[0].detach()
        flat = x.reshape(-1, x.shape[-1])  # in the forward's dtype: GPTQ's Hessian products run in it
        if self.gptq is not None:
            self.gptq.add_batch(flat)
        if self.imatrix:
            s = flat.float().pow(2).sum(0)
            self.sum_sq = s if self.sum_sq is None else self.sum_sq + s
            self.count += flat.shape[0]
        if self.stop:
            raise _StopForward


# ---- the pipeline ----

class LayerwiseQuantizer:
    def __init__(self, ckpt, targets: dict[str, Target], writers: list, calib_tokens: torch.Tensor | None,
                 options: PipelineOptions, work_dir: Path | None = None, resume: bool = True,
                 calibration: dict[str, Any] | None = None, progress: bool = True,
                 log_fn: Callable[[str], None] | None = None, importance: dict[str, torch.Tensor] | None = None,
                 keep_work: bool = False, companion: Companion | None = None,
                 embedding_hessian: torch.Tensor | None = None):
        self.ckpt = ckpt
        self.keep_work = keep_work  # after success, leave the work dir to the caller (it places the outputs first)
        self.work: WorkDir | None = None
        self.kept_work: Path | None = None  # set by release_work when a failed run leaves its work dir for a resume
        self.given_importance = importance or {}  # canonical name -> mean x² per input column (an imatrix file)
        self.config = ckpt.config
        self.targets = {n: targets.get(n) for n in ckpt.tensor_names()}
        unknown = [n for n in targets if n not in ckpt.tensors]
        if unknown:
            raise SchemeError(f"plan names tensor {unknown[0]!r}, which the checkpoint does not have")
        self.writers = writers
        # a second target set from the same calibration (GGUF beside integer formats), for its own writer
        self.companion = companion
        self.companion_targets = ({n: companion.targets.get(n) for n in ckpt.tensor_names()}
                                  if companion is not None else {})
        self.companion_results: dict[str, Any] = {}  # the current layer's companion tensors
        self.options = options
        self.method = options.method
        if self.method not in ("rtn", "gptq", "awq"):
            raise SchemeError(f"unknown method {self.method!r}; choose rtn, gptq or awq")
        ggml_quant = any(is_block_type(t) for t in [*self.targets.values(), *self.companion_targets.values()])
        self.uses_imatrix = options.collect_imatrix or (ggml_quant and self.method == "rtn" and calib_tokens is not None
                                                        and options.importance_for_ggml and not self.given_importance)
        self.needs_forward = self.method in ("gptq", "awq") or self.uses_imatrix
        if self.method in ("gptq", "awq") and calib_tokens is None:
            raise CalibrationError(f"--method {self.method} needs calibration data (--calib)")
        self.tokens = calib_tokens if self.needs_forward else None
        self.calibration = calibration or {}
        self.device = torch.device(options.device)
        if options.compute_dtype not in COMPUTE_DTYPES:
            raise SchemeError(f"compute dtype {options.compute_dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
        # what the calibration activations, the layer's forward and the Hessian products run in (GPTQ only: AWQ's
        # layer and activations and the imatrix pass stay in float32; AWQ's scale search runs a copy in it)
        self.act_dtype = getattr(torch, options.compute_dtype) if self.method == "gptq" else torch.float32
        self._masters: dict[str, torch.Tensor] = {}  # the source weights of the layer when it runs in bf16
        self.work_dir = Path(work_dir) if work_dir else None
        self.resume = resume
        self.progress = progress
        self.log_fn = log_fn
        calib_sha = self.calibration.get("tokens_sha256") if self.tokens is not None else None
        if self.tokens is not None and calib_sha is None:
            from quantkit.calib import tokens_sha256

            calib_sha = tokens_sha256(self.tokens)
        if self.given_importance:
            h = hashlib.sha256()
            for k in sorted(self.given_importance):
                h.update(k.encode() + self.given_importance[k].float().numpy().tobytes())
            calib_sha = f"{calib_sha}+imatrix:{h.hexdigest()[:16]}"
        # GPTQ: the embedding rounded against the output's Fisher matrix (`quant/fisher.py`; an allocation's)
        self.embedding_gptq = None
        if embedding_hessian is not None and self.method == "gptq":
            from quantkit.quant.fisher import embedding_gptq

            self.embedding_gptq = embedding_gptq(embedding_hessian, self.device)
            digest = hashlib.sha256(embedding_hessian.float().contiguous().numpy().tobytes()).hexdigest()[:16]
            calib_sha = f"{calib_sha}+embedding-fisher:{digest}"
        self.fingerprint = run_fingerprint(ckpt, self.targets, options, calib_sha, self.companion_targets)
        self.log: list[dict[str, Any]] = []
        self.imatrix: dict[str, tuple[torch.Tensor, int]] = {}
        self._inputs = None

    # ---- small pieces ----

    def _emit(self, name: str, tensor, companion=None) -> None:
        """`tensor` to the writers; `companion` (default: the same tensor) to the companion's writer."""
        for w in self.writers:
            w.add(name, tensor)
        if self.companion is not None:
            self.companion.writer.add(name, tensor if companion is None else companion)

    def _companion_of(self, name: str, source: torch.Tensor):
        """The companion's version of a tensor not quantized in a group (embedding, norms, lm_head, float linears):
        the source tensor onto its companion target, or None (the same tensor) when that target keeps it float."""
        target = self.companion_targets.get(name)
        if self.companion is None or target is None or is_float_type(target):
            return None
        return self._quantize_global(name, source, target)

    def _layer_inputs(self, seqlen: int):
        """(positions, rope, mask) of the calibration sequences, from the model (fp32, no cache)."""
        if self._inputs is None or self._inputs[0] != seqlen:
            self._inputs = (seqlen, sequence_inputs(self.config, seqlen, self.device, self.act_dtype))
        return self._inputs[1]

    def _embed(self) -> tuple[tuple[Any, Any], torch.Tensor | None]:
        """((the embedding as written, its companion or None), the calibration activations entering layer 0)."""
        name = EMBEDDING
        w = self.ckpt.get_tensor(name)
        check_finite(name, w)
        acts = None
        if self.tokens is not None:
            acts = torch.cat([F.embedding(self.tokens[i:i + 64], w).to(self.act_dtype)
                              for i in range(0, self.tokens.shape[0], 64)])
        return (self._quantize_global(name, w, self.targets.get(name)), self._companion_of(name, w)), acts

    def _quantize_global(self, name: str, w: torch.Tensor, target: Target):
        """Embeddings, final norm and lm_head: float, or a ggml type (RTN; llama.cpp leaves them out of the imatrix;
        with GPTQ, lm_head goes through `_gptq_head` instead, and the embedding is GPTQ-rounded when the run was
        given its Fisher matrix)."""
        if target is None or is_float_type(target):
            return w
        if name == EMBEDDING and self.embedding_gptq is not None:  # `_embed` has checked it is finite
            return self._gptq_logged(self.embedding_gptq, w.to(self.device, torch.float32), target, name,
                                     {"layer": -1, "module": "embed_tokens", "hessian": "output fisher"})
        if isinstance(target, Scheme):
            check_finite(name, w)
            return quantize_rtn(w, target)
        check_finite(name, w)
        return encode_ggml(w, target, None)

    def _gptq_quantize(self, gptq, weight: torch.Tensor, target: Target, name: str, last: bool = False):
        """GPTQ of one weight onto its target with the run's options (`gguf.grids.gptq_round`): (quantized tensor,
        GPTQInfo or None for a lattice i-quant). `last`: the Hessian's last use (GPTQ frees it once the factor is
        computed)."""
        o = self.options
        return gptq_round(gptq, weight, target, name, damp=o.damp, block_size=o.block_size,
                          static_groups=o.static_groups, group_aware=o.group_aware, last=last,
                          refine_sweeps=o.refine_sweeps)

    def _gptq_logged(self, gptq, weight: torch.Tensor, target: Target, name: str, row: dict[str, Any],
                     gptq_row: dict[str, Any] | None = None):
        """`_gptq_quantize` of a whole-model tensor (embedding, lm_head), logged: `row` says where, `gptq_row` what
        applies only when GPTQ ran (not for a lattice i-quant's imatrix search); the quantized tensor."""
        t0 = time.perf_counter()
        qt, info = self._gptq_quantize(gptq, weight, target, name)
        qt.error.pop("seconds", None)
        row = {**row, "target": target_label(target), "method": "imatrix"}
        if info is not None:
            row.update({"method": "gptq", "loss": info.loss, "damp": info.damp, **(gptq_row or {})})
        self.log.append({**row, "seconds": round(time.perf_counter() - t0, 4)})
        return qt

    def _gptq_head(self, w: torch.Tensor, acts: torch.Tensor | None) -> tuple[Any, Any]:
        """GPTQ for a quantized lm_head (and for its companion target, from the same Hessian), on the final norm's
        outputs of the calibration windows (the residual stream `acts` after the last layer): (head, companion),
        None for a target kept in float or when the method is not GPTQ."""
        name = "lm_head.weight"
        targets = (self.targets.get(name), self.companion_targets.get(name))
        wanted = [t is not None and not is_float_type(t) for t in targets]
        if self.method != "gptq" or acts is None or not any(wanted):
            return None, None
        from quantkit.model.reference import RMSNorm
        from quantkit.quant.head_hessian import HeadHessians

        dev = self.device
        norm = RMSNorm(self.config.hidden_size, self.config.rms_norm_eps).to(dev)
        norm.weight.data = self.ckpt.get_tensor("model.norm.weight").to(dev, torch.float32)
        gptq = HeadHessians(w, self.options.head_clusters, device=dev)
        bs = max(1, self.options.batch_size)
        with torch.no_grad():
            for a in range(0, acts.shape[0], bs):
                gptq.add_batch(norm(acts[a:a + bs].to(dev)).reshape(-1, w.shape[1]))
        w32 = w.to(dev, torch.float32)
        heads = []
        for target, want, output in zip(targets, wanted, ("", self.companion.name if self.companion else "")):
            if not want:
                heads.append(None)
                continue
            heads.append(self._gptq_logged(
                gptq, w32, target, name,
                {"layer": self.config.num_hidden_layers, "module": "lm_head", **({"output": output} if output else {})},
                {"n_tokens": gptq.n_tokens,
                 "hessian": f"KL, {gptq.clusters} row clusters" if gptq.clusters > 1 else "input"}))
        return heads[0], heads[1]

    def _build_layer(self, tensors: dict[str, torch.Tensor], prefix: str) -> DecoderLayer:
        with torch.device("meta"):
            layer = DecoderLayer(self.config)
        state = {k[len(prefix):]: v.to(self.device, self.act_dtype) for k, v in tensors.items()}
        layer.load_state_dict(state, assign=True, strict=True)
        return layer.eval()

    def _forward_all(self, layer: DecoderLayer, acts: torch.Tensor, collect_out: bool = True):
        """Run every calibration sample through `layer`; returns the outputs (or None when a hook stops early)."""
        inputs = self._layer_inputs(acts.shape[1])
        outs = []
        bs = max(1, self.options.batch_size)
        with torch.no_grad():
            for i in range(0, acts.shape[0], bs):
                x = acts[i:i + bs].to(self.device)
                try:
                    y = layer(x, *inputs)
                except _StopForward:
                    continue
                if collect_out:
                    outs.append(y.to("cpu", torch.float32))
        return torch.cat(outs) if outs and collect_out else None

    # ---- one layer ----

    def _quantize_layer(self, i: int, acts: torch.Tensor | None
                        ) -> tuple[list[tuple[str, Any, Any]], torch.Tensor | None, list[dict]]:
        prefix = arch.layer_prefix(i)
        tensors = self.ckpt.layer_tensors(i)
        for name, t in tensors.items():
            check_finite(name, t)
        source_dtypes = {n: t.dtype for n, t in tensors.items()}
        log_rows: list[dict] = []
        layer = self._build_layer(tensors, prefix)
        self._masters = tensors if self.act_dtype != torch.float32 else {}
        del tensors
        modules = dict(layer.named_modules())
        results: dict[str, Any] = {}
        folded_norms = False

        out_acts = None
        if self.method == "rtn":
            # data-free rounding; with an imatrix, one full-precision pass collects Σx² for every linear
            # (llama-imatrix's convention: statistics of the unquantized model) and gives the next layer's inputs
            if acts is not None:
                collectors = {}
                handles = []
                for group in arch.LINEAR_GROUPS:
                    c = _Collector(imatrix=True)
                    collectors[group] = c
                    handles.append(modules[group[0]].register_forward_pre_hook(c))
                try:
                    out_acts = self._forward_all(layer, acts)
                finally:
                    for h in handles:
                        h.remove()
                for group, c in collectors.items():
                    if c.sum_sq is not None:
                        for local in group:
                            self.imatrix[f"{prefix}{local}.weight"] = (c.sum_sq.cpu(), c.count)
            for group in arch.LINEAR_GROUPS:
                self._quantize_group(i, group, prefix, modules, None, 0.0, source_dtypes, results, log_rows)
        elif self.method == "gptq":
            out_acts = self._gptq_layer(i, layer, acts, prefix, modules, source_dtypes, results, log_rows)
        else:  # awq: fold the searched scales, then round each group on inputs through the folded layer
            folded_norms = self._apply_awq(layer, acts, prefix, log_rows)
            for group in arch.LINEAR_GROUPS:
                names = [f"{prefix}{local}.weight" for local in group]
                if (not any(self.targets.get(n) is not None or self.companion_targets.get(n) is not None
                            for n in names) and not self.uses_imatrix):
                    continue
                fwd_seconds = 0.0
                if self.uses_imatrix:
                    collector = _Collector(imatrix=True, stop=True)
                    handle = modules[group[0]].register_forward_pre_hook(collector)
                    t0 = time.perf_counter()
                    try:
                        self._forward_all(layer, acts, collect_out=False)
                    finally:
                        handle.remove()
                    fwd_seconds = time.perf_counter() - t0
                    if collector.sum_sq is not None:
                        for n in names:
                            self.imatrix[n] = (collector.sum_sq.cpu(), collector.count)
                self._quantize_group(i, group, prefix, modules, None, fwd_seconds, source_dtypes, results, log_rows)
            out_acts = self._forward_all(layer, acts)

        # the layer's tensors in file order (norms may carry folded AWQ scales)
        params = dict(layer.named_parameters())
        named: list[tuple[str, Any, Any]] = []  # (name, tensor, companion tensor or None)
        for suffix in arch.LAYER_TENSORS:
            n = prefix + suffix
            if n not in source_dtypes:
                continue
            companion = self.companion_results.pop(n, None)
            if n in results:
                named.append((n, results[n], companion))
                continue
            value = self._masters.get(n, params[suffix]).detach().to("cpu")
            # unquantized linears and norms keep the source dtype (fp16 for AWQ-folded norms, which need it)
            folded = folded_norms and "norm" in suffix and self.targets.get(n) is None
            value = value.to(torch.float16 if folded else source_dtypes[n])
            if companion is None:
                companion = self._companion_of(n, value)
            named.append((n, self._quantize_global(n, value, self.targets.get(n)), companion))
        del layer, modules, params
        self._masters = {}
        return named, out_acts, log_rows

    def _gptq_layer(self, i: int, layer: DecoderLayer, acts: torch.Tensor, prefix: str, modules: dict,
                    source_dtypes: dict, results: dict, log_rows: list) -> torch.Tensor:
        """True-sequential GPTQ with staged inputs: each group's inputs are computed once from cached tensors,
        by the layer's own sub-steps (DecoderLayer.forward is their composition).

        q/k/v see attention_input(x); o_proj sees attention_core (with quantized q/k/v; the only attention pass);
        gate/up see mlp_input(h) with h = attention_output(x, core) (quantized o); down sees mlp_hidden (quantized
        gate/up); the layer output is mlp_output(h, hidden) (quantized down).
        """
        from quantkit.quant.gptq import GPTQ

        assert arch.LINEAR_GROUPS == (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                      ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
        bs = max(1, self.options.batch_size)
        positions, rope, mask = self._layer_inputs(acts.shape[1])
        batches = [(j, min(j + bs, acts.shape[0])) for j in range(0, acts.shape[0], bs)]
        dev = self.device

        def run_group(group, inputs_fn):
            names = [f"{prefix}{local}.weight" for local in group]
            quantized = any(self.targets.get(n) is not None or self.companion_targets.get(n) is not None
                            for n in names)
            if not quantized and not self.uses_imatrix:
                return
            gptq = GPTQ(modules[group[0]].in_features, name=f"{prefix}{group[0]}", device=dev) if quantized else None
            collector = _Collector(gptq=gptq, imatrix=self.uses_imatrix)
            t0 = time.perf_counter()
            with torch.no_grad():
                for a, b in batches:
                    collector(None, (inputs_fn(a, b),))
            fwd = time.perf_counter() - t0
            if self.uses_imatrix and collector.sum_sq is not None:
                for n in names:
                    self.imatrix[n] = (collector.sum_sq.cpu(), collector.count)
            self._quantize_group(i, group, prefix, modules, gptq, fwd, source_dtypes, results, log_rows)

        x_of = lambda a, b: acts[a:b].to(dev)  # noqa: E731
        run_group(arch.LINEAR_GROUPS[0], lambda a, b: layer.attention_input(x_of(a, b)))

        # the attention core with quantized q/k/v, once: the input of o_proj (per batch, [b, seq, q_size] on cpu)
        with torch.no_grad():
            attn_in = [layer.attention_core(layer.attention_input(x_of(a, b)), positions, rope, mask).cpu()
                       for a, b in batches]
        run_group(arch.LINEAR_GROUPS[1], lambda a, b: attn_in[a // bs].to(dev))  # noqa: F821 (freed below)

        with torch.no_grad():
            h_mid = [layer.attention_output(x_of(a, b), attn_in[a // bs].to(dev)).cpu() for a, b in batches]
        del attn_in
        mlp_in = lambda a, b: layer.mlp_input(h_mid[a // bs].to(dev))  # noqa: E731
        run_group(arch.LINEAR_GROUPS[2], mlp_in)

        down_in = lambda a, b: layer.mlp_hidden(mlp_in(a, b))  # noqa: E731
        run_group(arch.LINEAR_GROUPS[3], down_in)
        out = torch.empty_like(acts, device="cpu")  # filled batch by batch: no list + cat copy (0.5 GB at 7B)
        with torch.no_grad():
            for a, b in batches:
                out[a:b] = layer.mlp_output(h_mid[a // bs].to(dev), down_in(a, b))
        return out

    def _quantize_group(self, i: int, group: tuple[str, ...], prefix: str, modules: dict, gptq, fwd_seconds: float,
                        source_dtypes: dict, results: dict, log_rows: list) -> None:
        """Quantize the linears of one group and put their dequantized weights back into the layer (the companion
        targets first, all of the group's, from the same unquantized weights and Hessian; they never enter the
        forward. Solving one target set after the other, not alternating, lets GPTQ reuse each processing order's
        inverse-Hessian factor across the group)."""
        def unquantized(n: str, local: str) -> torch.Tensor:
            return self._masters[n].to(self.device, torch.float32) if n in self._masters else modules[local].weight.data

        # the group's solves in order (companions first); the last one may free the Hessian
        solves = [(kind, local) for kind, targets in (("companion", self.companion_targets), ("primary", self.targets))
                  for local in group if targets.get(f"{prefix}{local}.weight") is not None]
        final = solves[-1] if solves else None
        for local in group:
            n = f"{prefix}{local}.weight"
            if self.companion_targets.get(n) is not None:
                qt2, row, _ = self._quantize_one(n, self.companion_targets[n], unquantized(n, local), gptq,
                                                 source_dtypes[n], last=final == ("companion", local))
                self.companion_results[n] = qt2
                log_rows.append({"layer": i, "module": local, "output": self.companion.name, **row})
        for local in group:
            n = f"{prefix}{local}.weight"
            mod = modules[local]
            weight = unquantized(n, local)
            target = self.targets.get(n)
            if target is None:
                continue
            qt, row, w_hat = self._quantize_one(n, target, weight, gptq, source_dtypes[n],
                                                last=final == ("primary", local))
            del weight
            # its source weight is not read again (the output takes `qt`): at 7B a layer's are 0.44 GB in bf16
            self._masters.pop(n, None)
            if w_hat is not None:
                mod.weight.data = w_hat.to(self.device, mod.weight.dtype)
            if fwd_seconds:
                row["fwd_seconds"] = round(fwd_seconds, 4)
            results[n] = qt
            log_rows.append({"layer": i, "module": local, **row})

    def _quantize_one(self, n: str, target: Target, weight: torch.Tensor, gptq, source_dtype: torch.dtype,
                      last: bool = False):
        """One linear's weight onto `target`: GPTQ with the group's Hessian (`last`: its last use), else RTN /
        ggml encoding (with the imatrix). Returns (stored tensor, log row, its dequantized weight or None for a
        float target)."""
        t0 = time.perf_counter()
        row: dict[str, Any] = {"target": target_label(target), "method": self.method}
        if gptq is not None and not is_float_type(target):
            qt, info = self._gptq_quantize(gptq, weight, target, n, last=last)
            if info is None:
                row["method"] = "imatrix"
            else:
                row.update({"loss": info.loss, "damp": info.damp, "damp_retries": info.damp_retries,
                            "n_tokens": info.n_tokens})
        elif isinstance(target, Scheme):
            qt = quantize_rtn(weight, target)
        elif is_float_type(target):
            qt = weight.to(source_dtype)
        else:
            importance = self.given_importance.get(n)
            if importance is None and n in self.imatrix and self.options.importance_for_ggml:
                s, c = self.imatrix[n]
                importance = s / max(c, 1)
            qt = encode_ggml(weight, target, importance)
        w_hat = None
        if isinstance(qt, (QuantTensor, GGMLTensor)):
            qt.error.pop("seconds", None)  # timings go to the log, not into the (reproducible) output
            w_hat = _dequant(qt)
            sq = qt.error.get("sqnr_db")
            row["sqnr_db"] = sq if sq is not None else round(sqnr_db(weight, w_hat), 3)
        row["seconds"] = round(time.perf_counter() - t0, 4)
        return qt, row, w_hat

    def _apply_awq(self, layer: DecoderLayer, acts: torch.Tensor, prefix: str, log_rows: list) -> bool:
        """Search and fold AWQ scales (and clipping) into `layer` in place; True when norms were modified."""
        schemes = {}
        for group in arch.LINEAR_GROUPS:
            for local in group:
                t = self.targets.get(f"{prefix}{local}.weight")
                if isinstance(t, Scheme):
                    schemes[local] = t
        if not schemes:
            return False
        t0 = time.perf_counter()
        info = awq.awq_layer(layer, acts, schemes, inputs=self._layer_inputs(acts.shape[1]),
                             batch_size=self.options.batch_size, device=self.device,
                             search_dtype=getattr(torch, self.options.compute_dtype),
                             rank_every=AWQ_RANK_EVERY)
        row = {"layer": int(prefix.split(".")[2]), "module": "awq", "seconds": round(time.perf_counter() - t0, 4)}
        if isinstance(info, dict):
            row.update({k: v for k, v in info.items() if isinstance(v, (int, float, str, bool))})
        log_rows.append(row)
        return True

    # ---- whole run ----

    def _replay(self, work: WorkDir, completed: int) -> None:
        """Hand the finished tensors of a resumed run's embedding and first `completed` layers to the writers. In a
        function of its own so that no loop variable outlives it: a reloaded tensor is a view of its work-dir file,
        and one live view keeps the whole file mapped, with every page the writers read resident, through the next
        layer (at 7B, 0.3 GB)."""
        for name, t, t2 in work.load_embedding():
            self._emit(name, t, t2)
        for i in range(completed):
            named, imatrix, rows = work.load_layer(i)
            for name, t, t2 in named:
                self._emit(name, t, t2)
            self.imatrix.update(imatrix)
            self.log += rows

    def run(self) -> PipelineResult:
        t_start = time.perf_counter()
        n_layers = self.config.num_hidden_layers
        work = self.work = WorkDir(self.work_dir, self.fingerprint, n_layers) if self.work_dir is not None else None
        start = 0
        acts = None
        try:
            if work is not None:
                start = work.start(self.resume)
            if start == 0:
                (embed, embed2), acts = self._embed()
                if work is not None:
                    work.save_embedding([("model.embed_tokens.weight", embed, embed2)])
                    if acts is not None:
                        work.save_activations(acts)
                self._emit("model.embed_tokens.weight", embed, embed2)
                del embed, embed2
            else:
                self._replay(work, start)
                if self.needs_forward:
                    acts = work.load_activations()
                if self.log_fn:
                    self.log_fn(f"resuming from layer {start}/{n_layers} ({work.path})")
            bar = None
            if self.progress:
                from quantkit.progress import progress

                bar = progress(total=n_layers, initial=start, desc=f"quantize ({self.method})", unit="layer",
                               leave=False)
            for i in range(start, n_layers):
                named, out_acts, rows = self._quantize_layer(i, acts)
                acts = out_acts
                if work is not None:
                    prefix = arch.layer_prefix(i)
                    work.save_layer(i, named, {n: v for n, v in self.imatrix.items() if n.startswith(prefix)}, rows)
                    if acts is not None:
                        work.save_activations(acts)
                    work.mark_completed(i + 1)
                for name, t, t2 in named:
                    self._emit(name, t, t2)
                self.log += rows
                del named
                if bar is not None:
                    bar.update(1)
                    if rows:
                        last = rows[-1]
                        bar.set_postfix_str(f"{last['module']} sqnr {last.get('sqnr_db', '-')} dB", refresh=False)
                for hook in LAYER_DONE_HOOKS:
                    hook(i)
            if bar is not None:
                bar.close()
            for name in ("model.norm.weight", "lm_head.weight"):
                if name in self.ckpt.tensors:
                    w = self.ckpt.get_tensor(name)
                    check_finite(name, w)
                    head, head2 = self._gptq_head(w, acts) if name == "lm_head.weight" else (None, None)
                    if head is None:
                        head = self._quantize_global(name, w, self.targets.get(name))
                    self._emit(name, head, head2 if head2 is not None else self._companion_of(name, w))
                    del w
            acts = None
            outputs = [w.finish() for w in self.writers]
            if self.companion is not None:
                outputs.append(self.companion.writer.finish())
        except BaseException as e:
            self._abort()
            self.release_work(e)
            raise
        if not self.keep_work:
            self.release_work(None)
        return PipelineResult(outputs, self.log, self.imatrix, start, time.perf_counter() - t_start, self.fingerprint,
                              self.calibration)

    def release_work(self, error: BaseException | None) -> Path | None:
        """After the run (and, with keep_work, after the caller placed the outputs): remove the work dir, unless
        `error` is one a resume gets past and completed layers are there. Returns (and sets `kept_work` to) the
        directory when it is kept for a resume."""
        work = self.work
        self.kept_work = None
        if work is None:
            return None
        if error is None:
            work.remove()
            return None
        if not resumable(error):
            work.discard()  # this run's own start; one made by an earlier run stays as it was
        elif work.fresh and work.completed() == 0:
            work.discard()  # nothing a resume could use
        if work.path.is_dir() and work.completed() > 0:
            self.kept_work = work.path
        return self.kept_work

    def kept_note(self) -> str:
        """The sentence an error message adds when completed layers are kept for a resume."""
        kept = self.kept_work
        if kept is None or self.work is None:
            return ""
        how = "run the same command again" if self.resume else "run the same command without --no-resume"
        return (f"; completed layers ({self.work.completed()} of {self.config.num_hidden_layers}) are kept in {kept}: "
                f"{how} to resume, or delete {kept}")

    def _abort(self) -> None:
        for w in [*self.writers, *([self.companion.writer] if self.companion is not None else [])]:
            try:
                w.abort()
            except Exception:
                pass


def resumable(error: BaseException) -> bool:
    """Whether a re-run of the same command can get past `error` and so use the completed layers: an interruption,
    a write fault (disk full, file-size limit, permissions) or running out of memory; not bad input or options."""
    if isinstance(error, (KeyboardInterrupt, MemoryError, WriteError)):
        return True
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    return write_error(error) is not None


def quantize_model(ckpt, targets: dict[str, Target], writers: list, calib_tokens: torch.Tensor | None = None,
                   options: PipelineOptions | None = None, **kwargs) -> PipelineResult:
    """Run the layer-wise pipeline (see the module docstring); `writers` get every tensor in file order. A write
    fault is raised as WriteError/OutOfSpaceError (saying where completed layers are kept for a resume)."""
    q = LayerwiseQuantizer(ckpt, targets, writers, calib_tokens, options or PipelineOptions(), **kwargs)
    try:
        return q.run()
    except Exception as e:
        fault = write_error(e, note=q.kept_note())
        if fault is None:
            raise
        raise fault from None
