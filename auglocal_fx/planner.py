"""Plan for a memory budget: predict the peak training memory of BP and of AugLocal for candidate K and aux depth.

Nothing is trained and no full step is run. The model is traced once (as :func:`auglocal_fx.convert` does) and:

* the plan of every candidate ``(K, d)`` gives the parameters of the backbone and of every aux net (unit copies,
  shape adapters, head copy) and so the parameter state: weights and buffers, optimizer state, gradients;
* the activation footprint of every unit, of every shape adapter and of the head (with the loss) is measured once
  with :class:`~auglocal_fx.memory.SavedTensorTracker`: a forward pass of that piece alone on batches of 2 and 4,
  fitted as ``fixed + per_sample * batch`` and evaluated at the target batch. Pieces are then chained: a chain
  saves the sum of its pieces' saved bytes, less the tensors two neighbours both save (a block's output that the
  next block saves again);
* each step is then replayed on paper, piece by piece: forward saves activations; backward frees a piece's
  activations and creates its parameters' gradients, with the gradients of the piece's input and output alive
  meanwhile. BP runs one chain (every unit and the head); AugLocal runs layer ``k`` then aux net ``k`` and, with
  the per-layer optimizer step (the default, as ``auglocal bench``), drops layer ``k``'s gradients before layer
  ``k+1``. BP with activation checkpointing (:mod:`auglocal_fx.checkpointing`, segments of units chosen as
  ``auglocal bench --methods checkpoint`` chooses them at K = units) keeps each segment's input; while backward
  runs segment ``j``, the inputs of segments ``0..j``, segment ``j``'s recomputed activations and the gradients
  of segments ``j..`` are alive.

The predicted peak is ``weights + optimizer state + input batch + the step's worst moment`` for each method, the
same quantity ``auglocal bench`` measures, so the two are compared directly (docs/benchmarks.md).

Example::

    report = plan_memory(torchvision.models.resnet50(), batch=64, budget=parse_bytes("8GiB"))
    print(format_plan_report(report))
    report["recommended"]     # {"layers": K, "aux_depth": d, "predicted_peak": bytes, ...} or None
    report["checkpoint"]      # BP with activation checkpointing: {"segments": [[0, 4], ...], "predicted_peak": ...}
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bench.memory import GiB, format_bytes, parse_bytes
from .checkpointing import checkpoint_segments
from .memory import SavedTensorTracker

__all__ = ["plan_memory", "format_plan_report", "Piece", "parse_bytes"]

_PROBE_BATCHES = (2, 4)  # > 1: BatchNorm in training mode needs more than one value per channel
_OPTIMIZER_STATES = {"sgd": 1, "sgd-nomomentum": 0, "adamw": 2}  # state tensors per parameter


def _convert_module():
    import auglocal_fx.convert  # noqa: F401  (the package attribute `convert` is the function)

    return sys.modules["auglocal_fx.convert"]


# ------------------------------------------------------------------------------------------------ pieces
@dataclass
class Piece:
    """The measured footprint of one piece (a unit, an adapter, the head with the loss), linear in the batch.

    ``saved(B)``: bytes it saves for backward; ``saves_input`` / ``saves_output``: whether its input / output
    tensor is among them (then a neighbour saving the same tensor does not add it twice); ``largest(B)``: its
    largest single saved tensor (a gradient of about that size is alive while its backward runs); ``in_bytes(B)``,
    ``out_bytes(B)``: its input and output; ``param_bytes``, ``buffer_bytes``: its parameters (also the size of
    their gradients) and buffers.
    """

    name: str
    saved: Tuple[float, float]  # (fixed, per sample)
    largest: Tuple[float, float]
    in_bytes: Tuple[float, float]
    out_bytes: Tuple[float, float]
    saves_input: bool
    saves_output: bool
    param_bytes: int
    buffer_bytes: int

    @staticmethod
    def at(pair: Tuple[float, float], batch: int) -> float:
        return max(0.0, pair[0] + pair[1] * batch)


class _Probe(SavedTensorTracker):
    """SavedTensorTracker keyed by storage identity, so that fake tensors (whose storages all sit at address 0)
    are told apart."""

    def _storage_key(self, tensor: torch.Tensor) -> Tuple[str, int]:
        return str(tensor.device), tensor.untyped_storage()._cdata


def _fit(values: Sequence[float], batches: Sequence[int]) -> Tuple[float, float]:
    (b0, b1), (v0, v1) = batches, values
    per = (v1 - v0) / (b1 - b0)
    return (v0 - per * b0, per)


def _run_probe(module: nn.Module, in_shape: Sequence[int], dtype: torch.dtype, b: int, *, device: torch.device,
               amp: bool, loss_classes: Optional[int]) -> Tuple[int, int, int, int, bool, bool]:
    if dtype.is_floating_point:
        base = torch.randn((b, *in_shape), device=device, dtype=dtype, requires_grad=True)
        x = base.clone()  # a non-leaf that requires grad, as inside a network (in-place ops allowed)
    else:
        x = torch.zeros((b, *in_shape), device=device, dtype=dtype)
    probe = _Probe()
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with probe, autocast:
        out = module(x)
        if loss_classes is not None:
            out = F.cross_entropy(out, torch.zeros(b, dtype=torch.long, device=device))
    return (probe.current_bytes, probe.largest_bytes, x.untyped_storage().nbytes() if x.dim() else 0,
            out.untyped_storage().nbytes(), probe.saved(x), probe.saved(out))


def _measure(name: str, module: nn.Module, in_shape: Sequence[int], dtype: torch.dtype, *, device: torch.device,
             amp: bool, loss_classes: Optional[int] = None) -> Piece:
    """Run ``module`` alone in training mode on batches of 2 and 4 and fit its footprint.

    Fake tensors first (shapes only: nothing is computed or allocated, and autograd saves the same tensors); the
    real thing where fake tensors cannot run the module."""
    rows = None
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            rows = [_run_probe(module, in_shape, dtype, b, device=device, amp=amp, loss_classes=loss_classes)
                    for b in _PROBE_BATCHES]
    except Exception:
        rows = None
    if rows is None:
        rows = [_run_probe(module, in_shape, dtype, b, device=device, amp=amp, loss_classes=loss_classes)
                for b in _PROBE_BATCHES]
    params = [p for p in module.parameters() if p.requires_grad]
    return Piece(
        name=name,
        saved=_fit([r[0] for r in rows], _PROBE_BATCHES),
        largest=_fit([r[1] for r in rows], _PROBE_BATCHES),
        in_bytes=_fit([r[2] for r in rows], _PROBE_BATCHES),
        out_bytes=_fit([r[3] for r in rows], _PROBE_BATCHES),
        saves_input=all(r[4] for r in rows),
        saves_output=loss_classes is None and all(r[5] for r in rows),
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        buffer_bytes=sum(b.numel() * b.element_size() for b in module.buffers()),
    )


class _Pieces:
    """Measures each distinct piece once (cached), over the traced model of one analysis."""

    def __init__(self, analysis: Any, *, device: torch.device, amp: bool):
        self.analysis, self.device, self.amp = analysis, device, amp
        self.model = analysis.model
        self.model.to(device).train()
        self.position = {node.name: i for i, node in enumerate(analysis.cuts.body)}
        self._cache: Dict[Any, Piece] = {}

    def _dtype(self, position: int) -> torch.dtype:
        meta = self.analysis.cuts.crossing[position].meta.get("tensor_meta")
        return getattr(meta, "dtype", torch.float32)

    def segment(self, name: str, first_node: str, last_node: Optional[str], in_shape: Sequence[int],
                loss_classes: Optional[int] = None) -> Piece:
        key = ("segment", first_node, last_node)
        if key not in self._cache:
            from ._build import segment_module

            cuts = self.analysis.cuts
            start = self.position[first_node]
            end = self.position[last_node] + 1 if last_node is not None else len(cuts.body)
            module = segment_module(self.model, cuts, start, end, class_name="Probe")
            self._cache[key] = _measure(name, module, in_shape, self._dtype(start), device=self.device, amp=self.amp,
                                        loss_classes=loss_classes)
        return self._cache[key]

    def unit(self, spec: Any) -> Piece:
        return self.segment(spec.name, spec.first_node, spec.last_node, spec.in_shape)

    def head(self, plan: Any) -> Piece:
        return self.segment("head", plan.head.first_node, None, plan.head.in_shape,
                            loss_classes=int(plan.head.out_shape[0]))

    def adapter(self, spec: Any) -> Piece:
        key = ("adapter", tuple(spec.in_shape), tuple(spec.out_shape), spec.in_layout, spec.out_layout)
        if key not in self._cache:
            from ._adapters import ShapeAdapter

            module = ShapeAdapter(spec.in_shape, spec.out_shape, spec.in_layout, spec.out_layout).to(self.device).train()
            self._cache[key] = _measure("adapter", module, spec.in_shape, torch.float32, device=self.device, amp=self.amp)
        return self._cache[key]


# ------------------------------------------------------------------------------------------------ the step on paper
def _chain_saved(pieces: Sequence[Piece], batch: int, *, exclude_input: bool) -> List[float]:
    """Saved bytes each piece adds when the pieces run one after the other (shared neighbours counted once)."""
    adds = []
    for i, p in enumerate(pieces):
        s = Piece.at(p.saved, batch)
        if p.saves_input and ((i == 0 and exclude_input) or (i > 0 and pieces[i - 1].saves_output)):
            s -= Piece.at(p.in_bytes, batch)
        adds.append(max(0.0, s))
    return adds


def _replay(pieces: Sequence[Piece], batch: int, *, exclude_input: bool, grads_before: float = 0.0) -> Dict[str, float]:
    """Peak of (saved activations + gradients + backward temporaries) over one forward/backward of a chain.

    Forward: activations grow to their sum. Backward, last piece first: while piece j runs backward, pieces 0..j
    still hold their activations, pieces j.. have their parameters' gradients (set_to_none: created here), and the
    gradients of j's output and input plus one tensor the size of its largest saved one are alive. The chain's
    input never requires grad (the image; a local layer's detached input); unless excluded (the input batch,
    counted apart) it is alive throughout, saved or not.
    """
    adds = _chain_saved(pieces, batch, exclude_input=exclude_input)
    first = pieces[0]
    frozen = 0.0 if exclude_input or first.saves_input else Piece.at(first.in_bytes, batch)
    acts = sum(adds)
    peak = frozen + grads_before + acts
    at_peak = {"activations": acts, "grads": grads_before, "temporaries": 0.0}
    grads = grads_before
    for j in range(len(pieces) - 1, -1, -1):
        p = pieces[j]
        grads += p.param_bytes
        temp = Piece.at(p.out_bytes, batch) + Piece.at(p.largest, batch)
        if j > 0:
            temp += Piece.at(p.in_bytes, batch)
        alive = sum(adds[: j + 1])
        total = frozen + alive + grads + temp
        if total > peak:
            peak, at_peak = total, {"activations": alive, "grads": grads, "temporaries": temp}
    return {"peak": peak, "activations_peak": acts, "grads_end": grads, **{f"{k}_at_peak": v for k, v in at_peak.items()}}


def _state(param_bytes: float, buffer_bytes: float, optimizer: str) -> Dict[str, float]:
    return {"weights": param_bytes + buffer_bytes, "optimizer": param_bytes * _OPTIMIZER_STATES[optimizer]}


def _predict_bp(pieces: _Pieces, plan: Any, batch: int, batch_bytes: float, optimizer: str) -> Dict[str, Any]:
    chain = [pieces.unit(u) for u in plan.units] + [pieces.head(plan)]
    step = _replay(chain, batch, exclude_input=True)
    params = sum(p.param_bytes for p in chain)
    state = _state(params, sum(p.buffer_bytes for p in chain), optimizer)
    peak = state["weights"] + state["optimizer"] + batch_bytes + step["peak"]
    return {"state": state, "step": step, "batch_bytes": batch_bytes, "predicted_peak": peak}


def _predict_checkpoint(pieces: _Pieces, plan: Any, batch: int, batch_bytes: float, optimizer: str,
                        segments: Optional[int]) -> Dict[str, Any]:
    """BP with activation checkpointing over segments of units (the head ends the last segment)."""
    units = [pieces.unit(u) for u in plan.units]
    head = pieces.head(plan)
    adds = _chain_saved(units + [head], batch, exclude_input=True)
    # Per unit: (its input, stored when it starts a segment; its saved bytes), the head's with the last unit's.
    costs = [(Piece.at(p.in_bytes, batch) if i else 0.0, adds[i]) for i, p in enumerate(units)]
    costs[-1] = (costs[-1][0], costs[-1][1] + adds[-1])
    ranges = checkpoint_segments(costs, segments)
    stored = [costs[a][0] for a, _ in ranges]  # the first segment's input is the batch, counted apart
    grads, step_peak, worst = 0.0, 0.0, None
    for j in range(len(ranges) - 1, -1, -1):
        a, b = ranges[j]
        chain = units[a:b] + ([head] if j == len(ranges) - 1 else [])
        r = _replay(chain, batch, exclude_input=True, grads_before=grads)
        grads = r["grads_end"]
        peak = sum(stored[: j + 1]) + r["peak"]
        if peak > step_peak:
            step_peak, worst = peak, {**r, "segment": j, "stored_inputs": sum(stored[: j + 1])}
    chain = units + [head]
    state = _state(sum(p.param_bytes for p in chain), sum(p.buffer_bytes for p in chain), optimizer)
    peak = state["weights"] + state["optimizer"] + batch_bytes + step_peak
    return {"state": state, "step": worst, "segments": [list(r) for r in ranges], "batch_bytes": batch_bytes,
            "predicted_peak": peak}


def _predict_local(pieces: _Pieces, plan: Any, batch: int, batch_bytes: float, optimizer: str, layer_step: bool) -> Dict[str, Any]:
    head = pieces.head(plan)
    last = plan.num_layers - 1
    bb_params = bb_buffers = aux_params = aux_buffers = 0.0
    grads_before = 0.0
    step_peak, worst, layers = 0.0, None, []
    for layer in plan.layers:
        chain = [pieces.unit(plan.units[u]) for u in layer.units]
        if layer.index == last:
            chain.append(head)
        bb_params += sum(p.param_bytes for p in chain)
        bb_buffers += sum(p.buffer_bytes for p in chain)
        if layer.index != last:
            aux = plan.aux[layer.index]
            aux_chain: List[Piece] = []
            for u, adapter in zip(aux.units, aux.adapters):
                if adapter is not None:
                    aux_chain.append(pieces.adapter(adapter))
                aux_chain.append(pieces.unit(plan.units[u]))
            aux_chain.append(head)
            aux_params += sum(p.param_bytes for p in aux_chain)
            aux_buffers += sum(p.buffer_bytes for p in aux_chain)
            chain = chain + aux_chain
        r = _replay(chain, batch, exclude_input=layer.index == 0, grads_before=0.0 if layer_step else grads_before)
        if not layer_step:
            grads_before = r["grads_end"]
        layers.append({"layer": layer.index, "activations": r["activations_peak"], "step_peak": r["peak"]})
        if r["peak"] > step_peak:
            step_peak, worst = r["peak"], r
    state = {"backbone": _state(bb_params, bb_buffers, optimizer), "aux": _state(aux_params, aux_buffers, optimizer)}
    state_total = sum(v for group in state.values() for v in group.values())
    return {
        "state": state,
        "aux_params": sum(a.params for a in plan.aux),
        "step": worst,
        "activations_peak": max(l["activations"] for l in layers),
        "largest_layer": max(layers, key=lambda l: l["step_peak"])["layer"],
        "layers": layers,
        "batch_bytes": batch_bytes,
        "predicted_peak": state_total + batch_bytes + step_peak,
    }


# ------------------------------------------------------------------------------------------------ public
def plan_memory(
    model: nn.Module,
    *,
    batch: int,
    budget: Optional[int] = None,
    layers: Optional[Sequence[int]] = None,
    aux_depths: Sequence[int] = (1, 2, 3, 4),
    pyramid: float = 0.5,
    input_size: Optional[Sequence[int]] = None,
    leaf_modules: Optional[Sequence[Any]] = None,
    device: str = "cpu",
    amp: bool = False,
    optimizer: str = "sgd",
    layer_step: bool = True,
    checkpoint_segments: Optional[int] = None,
) -> Dict[str, Any]:
    """Predict peak training memory (bytes) of BP and of AugLocal for every candidate ``(K, d)``; recommend one.

    ``layers``: candidate K values (default 2 .. one unit per layer); ``aux_depths``: candidate d. The
    recommendation is the fitting candidate with the fewest aux nets, then the shallowest (None if none fits).
    Footprints are measured on the CPU (or on ``device`` when it is CUDA and available); the model is not changed.
    ``checkpoint_segments``: segments of BP with activation checkpointing (default about sqrt(units)), whose
    peak is predicted too (``report["checkpoint"]``).
    """
    if optimizer not in _OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {', '.join(_OPTIMIZER_STATES)}, got {optimizer!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    started = time.perf_counter()
    conv = _convert_module()
    analysis = conv._analyze(model, input_size=input_size, leaf_modules=leaf_modules)
    n_units, max_layers = len(analysis.units), len(analysis.inner_cuts) + 1
    candidates_k = sorted(set(layers)) if layers else list(range(2, min(n_units, max_layers) + 1))
    for k in candidates_k:
        if k < 2 or k > max_layers:
            raise ValueError(f"K={k} is not possible: {type(model).__name__} has between 2 and {max_layers} local layers")
    probe_device = torch.device(device if device == "cuda" and torch.cuda.is_available() else "cpu")
    pieces = _Pieces(analysis, device=probe_device, amp=amp)
    size = analysis.input_size
    batch_bytes = batch * (torch.Size(size).numel() * 4 + 8)  # float32 images, int64 labels

    from .rules import get_rule

    rule = get_rule("auglocal")  # the planner predicts AugLocal's aux nets
    rule_options = rule.resolve_options(None)

    def make(k: int, d: int):
        return conv._make_plan(analysis, layers=k, aux_depth=d, pyramid=pyramid, aux_init="copy", cuts=None,
                               leaf_modules=leaf_modules, source=None, rule=rule, rule_options=rule_options)

    bp = _predict_bp(pieces, make(candidates_k[0], 1), batch, batch_bytes, optimizer)
    ckpt = _predict_checkpoint(pieces, make(candidates_k[0], 1), batch, batch_bytes, optimizer, checkpoint_segments)
    ckpt["ratio_to_bp"] = ckpt["predicted_peak"] / bp["predicted_peak"]
    ckpt["fits"] = budget is None or ckpt["predicted_peak"] <= budget
    rows = []
    for k in candidates_k:
        for d in sorted(set(aux_depths)):
            plan = make(k, d)
            pred = _predict_local(pieces, plan, batch, batch_bytes, optimizer, layer_step)
            rows.append({
                "layers": k,
                "aux_depth": d,
                "pyramid": pyramid,
                "aux_params": pred["aux_params"],
                "aux_flops_per_sample": sum(a.flops for a in plan.aux),
                "predicted_peak": pred["predicted_peak"],
                "ratio_to_bp": pred["predicted_peak"] / bp["predicted_peak"],
                "fits": budget is None or pred["predicted_peak"] <= budget,
                "detail": pred,
            })
    fitting = [r for r in rows if budget is not None and r["fits"]]
    recommended = min(fitting, key=lambda r: (r["layers"], r["aux_depth"])) if fitting else None
    backbone_flops = sum(u.flops for u in make(candidates_k[0], 1).units)
    return {
        "format": "auglocal-fx-plan",
        "version": 1,
        "model": (getattr(model, "_auglocal_source", None) or {}).get("name", type(model).__name__),
        "batch": batch,
        "input_size": list(size),
        "budget": budget,
        "device": device,
        "probed_on": str(probe_device),
        "amp": amp,
        "optimizer": optimizer,
        "optimizer_step": "layer" if layer_step else "global",
        "units": n_units,
        "backbone_flops_per_sample": backbone_flops,
        "bp": bp,
        "bp_fits": budget is None or bp["predicted_peak"] <= budget,
        "checkpoint": ckpt,
        "candidates": rows,
        "recommended": {k: v for k, v in recommended.items() if k != "detail"} if recommended else None,
        "seconds": time.perf_counter() - started,
    }


def format_plan_report(report: Dict[str, Any]) -> str:
    budget = report["budget"]
    lines = [
        f"{report['model']}: batch {report['batch']} x {'x'.join(str(v) for v in report['input_size'])}, "
        f"{report['optimizer']} ({report['optimizer_step']} step){', bf16 autocast' if report['amp'] else ''}, "
        f"device {report['device']}; budget {format_bytes(budget) if budget else 'none'}",
        f"BP (end-to-end): predicted peak {format_bytes(report['bp']['predicted_peak'])}"
        + ("" if budget is None else (" - fits" if report["bp_fits"] else " - does not fit")),
    ]
    ckpt = report.get("checkpoint")
    if ckpt:
        lines.append(
            f"BP with activation checkpointing ({len(ckpt['segments'])} segments of units "
            f"{[tuple(r) for r in ckpt['segments']]}): predicted peak {format_bytes(ckpt['predicted_peak'])}, "
            f"{ckpt['ratio_to_bp']:.2f}x BP" + ("" if budget is None else (" - fits" if ckpt["fits"] else " - does not fit")))
    lines.append("AugLocal predicted peak (GiB) by K (rows) and aux depth d (columns); * fits the budget:")
    depths = sorted({r["aux_depth"] for r in report["candidates"]})
    ks = sorted({r["layers"] for r in report["candidates"]})
    cell = {(r["layers"], r["aux_depth"]): r for r in report["candidates"]}
    header = ["K"] + [f"d={d}" for d in depths] + ["aux params (d=%d)" % depths[0]]
    table = [header]
    for k in ks:
        row = [str(k)]
        for d in depths:
            r = cell[(k, d)]
            row.append(f"{r['predicted_peak'] / GiB:.2f}{'*' if budget is not None and r['fits'] else ' '}")
        row.append(f"{cell[(k, depths[0])]['aux_params'] / 1e6:.1f}M")
        table.append(row)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, row in enumerate(table):
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    rec = report["recommended"]
    if budget is None:
        lines.append("no budget given: nothing to recommend")
    elif rec is None:
        lines.append(f"nothing fits {format_bytes(budget)}: lower the batch, use --amp, or more layers K")
    else:
        lines.append(
            f"recommended: --layers {rec['layers']} --aux-depth {rec['aux_depth']} --pyramid {rec['pyramid']} "
            f"(predicted {format_bytes(rec['predicted_peak'])}, {rec['ratio_to_bp']:.2f}x BP; "
            f"{rec['layers'] - 1} aux nets, {rec['aux_params'] / 1e6:.1f}M aux params)"
        )
        if report["bp_fits"]:
            lines.append("note: plain BP fits the budget too; local learning is not needed for memory")
        elif ckpt and ckpt["fits"]:
            lines.append("note: BP with activation checkpointing fits the budget too (same gradients as BP, more "
                         "compute: auglocal bench --methods bp,checkpoint,auglocal measures both)")
    lines.append(f"planned in {report['seconds']:.1f} s (activation footprints probed on {report['probed_on']})")
    return "\n".join(lines)
