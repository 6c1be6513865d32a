"""ONNX Runtime graph optimisation for the exported ViT encoder, saved to disk (`encoder.opt.onnx`).

docs/anchors.md measured that a plain export runs no faster under ONNX Runtime than torch eager on the
2-core CPU: the speed has to come from fused kernels. Two passes, in order:

1. `fuse_vit_attention`: timm's attention (qkv Linear -> reshape/permute -> split -> scaled dot
   product -> merge heads) as `torch.onnx.export(dynamo=True)` writes it, rewritten into one
   `com.microsoft.Attention` node per block. onnxruntime.transformers' own ViT attention fusion
   expects the Hugging Face ViT export (separate Q/K/V MatMuls) and matches none of these blocks, so
   we match timm's pattern ourselves (shapes, head count, scale, which qkv part feeds q, k and v) and
   leave any block we do not recognise untouched.
2. `onnxruntime.transformers.optimizer.optimize_model(model_type="vit")`: LayerNorm, SkipLayerNorm
   (residual add + LayerNorm) and BiasGelu fusion.

The result uses contrib ops, so it is an ONNX Runtime (CPU or CUDA EP) artefact; `encoder.onnx` stays
the portable, standard-ops file for TensorRT, Triton and other runtimes. The pipeline verifies the
optimised file against PyTorch like every other artefact.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from supmae_serve.common.optional import install_hint

MS_DOMAIN = "com.microsoft"


@dataclass
class OptimizeReport:
    attention_fused: int = 0
    attention_blocks: int = 0  # Softmax nodes seen (one per attention block)
    fused_ops: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # why a block was left unfused


class _Graph:
    """Producer/consumer lookups over an onnx GraphProto (rebuilt after each rewrite)."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in graph.node:
            for i in n.input:
                self.consumers[i].append(n)
        self.inits = {t.name: t for t in graph.initializer}
        self._np = numpy_helper.to_array
        self.outputs = {o.name for o in graph.output}

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output, else None."""
        if name in self.inits:
            return self._np(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return self._np(a.t)
        return None

    def only_consumer(self, name: str, op_type: str):
        cons = self.consumers.get(name, [])
        if len(cons) != 1 or cons[0].op_type != op_type or name in self.outputs:
            return None
        return cons[0]

    def prod(self, name: str, *op_types: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type in op_types else None


def _perm(node) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def _scale_path(g: _Graph, name: str, stop: set[str]) -> tuple[float, str] | None:
    """Walk back from `name` through scalar Mul/Div and shape-only ops (Reshape, Transpose,
    Squeeze) until a tensor in `stop`; return (product of the scalar factors, the tensor reached)."""
    scale = 1.0
    for _ in range(16):
        if name in stop:
            return scale, name
        node = g.producer.get(name)
        if node is None:
            return None
        if node.op_type in ("Mul", "Div"):
            a, b = node.input
            ca, cb = g.const(a), g.const(b)
            if cb is not None and cb.size == 1:
                scale = (
                    scale * float(cb.reshape(())) if node.op_type == "Mul" else scale / float(cb.reshape(()))
                )
                name = a
            elif ca is not None and ca.size == 1 and node.op_type == "Mul":
                scale, name = scale * float(ca.reshape(())), b
            else:
                return None
        elif node.op_type in ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Split"):
            name = node.input[0]
        else:
            return None
    return None


def fuse_vit_attention(model, num_heads: int, report: OptimizeReport | None = None) -> int:
    """Rewrite each timm attention block into `com.microsoft.Attention(x, Wqkv, bqkv)`; returns the count.

    Matched (N = batch, T = tokens, D = width, H = heads):
        x (N,T,D) -> MatMul(Wqkv (D,3D)) -> Add(bqkv (3D,)) -> Reshape (N,T,3,H,D/H)
          -> Transpose[2,0,3,1,4] (3,N,H,T,D/H) -> q, k, v (Slice/Squeeze, Gather or Split)
          -> scores = (q * a) @ (k^T * b) -> Softmax -> @ v (N,H,T,D/H)
          -> Transpose[0,2,1,3] (N,T,H,D/H) -> Reshape (N,T,D)
    timm orders the qkv columns as (3, H, D/H), which is the packed Q|K|V layout Attention expects.
    """
    from onnx import helper

    report = report if report is not None else OptimizeReport()
    g = _Graph(model.graph)
    rewrites = []  # (anchor node to replace position, new node)
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        report.attention_blocks += 1
        why = _match_attention(g, softmax, num_heads)
        if isinstance(why, str):
            report.skipped.append(f"{softmax.name or softmax.output[0]}: {why}")
            continue
        x, w, b, out, scale, first = why
        attrs = {"num_heads": num_heads}
        head_dim = g.inits[w].dims[1] // 3 // num_heads
        if not math.isclose(scale, head_dim**-0.5, rel_tol=1e-4):
            attrs["scale"] = float(scale)
        node = helper.make_node(
            "Attention", [x, w, b], [out], name=f"fused_attention_{len(rewrites)}", domain=MS_DOMAIN, **attrs
        )
        rewrites.append((first, node))

    if not rewrites:
        return 0
    # Each fused node replaces the Reshape that produced its output, and goes where its qkv MatMul was
    # (its inputs exist there, and everything reading the output comes later); then dead nodes go.
    replaced = {node.output[0] for _, node in rewrites}
    at = {id(first): node for first, node in rewrites}
    nodes = []
    for n in model.graph.node:
        if id(n) in at:
            nodes.append(at[id(n)])
        if not set(n.output) & replaced:
            nodes.append(n)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    remove_dead_nodes(model)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    report.attention_fused += len(rewrites)
    return len(rewrites)


def _match_attention(g: _Graph, softmax, num_heads: int):
    """-> (x, W name, bias name, output name, scale, qkv MatMul node) or a reason string."""
    pv = g.only_consumer(softmax.output[0], "MatMul")
    if pv is None or pv.input[0] != softmax.output[0]:
        return "softmax output is not the left input of one MatMul"
    merge_t = g.only_consumer(pv.output[0], "Transpose")
    if merge_t is None or _perm(merge_t) != [0, 2, 1, 3]:
        return "no Transpose[0,2,1,3] after the attention-weighted sum"
    merge_r = g.only_consumer(merge_t.output[0], "Reshape")
    if merge_r is None:
        return "no Reshape merging the heads"
    scores = g.prod(softmax.input[0], "MatMul")
    post_scale = 1.0
    if scores is None:  # the scale applied after the MatMul: softmax((q @ k^T) * s)
        mul = g.prod(softmax.input[0], "Mul", "Div")
        c = None if mul is None else g.const(mul.input[1])
        if c is None or c.size != 1:
            return "softmax input is neither a MatMul nor a MatMul scaled by a constant"
        post_scale = float(c.reshape(())) if mul.op_type == "Mul" else 1.0 / float(c.reshape(()))
        scores = g.prod(mul.input[0], "MatMul")
        if scores is None:
            return "no scores MatMul"
    # the head split: a Transpose[2,0,3,1,4] reached from v, q and k
    split_t = _walk_to_split(g, pv.input[1])
    if split_t is None:
        return "v does not come from a qkv Transpose[2,0,3,1,4]"
    stop = {split_t.output[0]}
    q = _scale_path(g, scores.input[0], stop)
    k = _scale_path(g, scores.input[1], stop)
    if q is None or k is None:
        return "q or k do not come from the same qkv tensor through scalar scaling only"
    order = [_split_index(g, t, split_t.output[0]) for t in (scores.input[0], scores.input[1], pv.input[1])]
    if order != [0, 1, 2]:
        return f"q, k, v are parts {order} of the qkv tensor, expected [0, 1, 2]"
    qkv_r = g.prod(split_t.input[0], "Reshape")
    if qkv_r is None:
        return "no Reshape to (N, T, 3, H, D/H) before the head split"
    shape = g.const(qkv_r.input[1])
    if shape is not None and (shape.size != 5 or int(shape[2]) != 3 or int(shape[3]) != num_heads):
        return f"qkv reshape {shape.tolist()} does not split into 3 x {num_heads} heads"
    add = g.prod(qkv_r.input[0], "Add")
    if add is None:
        return "no qkv bias Add"
    bias_name = next((i for i in add.input if i in g.inits), None)
    if bias_name is None:
        return "qkv bias is not an initializer"
    mm = g.prod(next(i for i in add.input if i != bias_name), "MatMul")
    if mm is None or mm.input[1] not in g.inits:
        return "no qkv MatMul with a weight initializer"
    w = g.inits[mm.input[1]]
    bias = g.inits[bias_name]
    if len(w.dims) != 2 or w.dims[1] != 3 * w.dims[0] or list(bias.dims) != [w.dims[1]]:
        return f"qkv weight {list(w.dims)} / bias {list(bias.dims)} are not (D, 3D) / (3D,)"
    if w.dims[0] % num_heads:
        return f"width {w.dims[0]} is not divisible by {num_heads} heads"
    for t in (mm.output[0], add.output[0], qkv_r.output[0], split_t.output[0]):
        if t in g.outputs:
            return "an intermediate tensor is a graph output"
    return mm.input[0], mm.input[1], bias_name, merge_r.output[0], q[0] * k[0] * post_scale, mm


def _split_index(g: _Graph, name: str, split_out: str) -> int | None:
    """Which part (0 q, 1 k, 2 v) of the (3, N, H, T, D/H) tensor `name` is taken from."""
    for _ in range(16):
        node = g.producer.get(name)
        if node is None:
            return None
        if node.input and node.input[0] == split_out:
            if node.op_type == "Slice":
                starts = g.const(node.input[1])
                axes = g.const(node.input[3]) if len(node.input) > 3 and node.input[3] else np.array([0])
                ok = (
                    starts is not None
                    and axes is not None
                    and starts.size == 1
                    and int(axes.reshape(-1)[0]) == 0
                )
                return int(starts.reshape(-1)[0]) if ok else None
            if node.op_type == "Gather":
                idx = g.const(node.input[1])
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                return int(idx.reshape(-1)[0]) if idx is not None and idx.size == 1 and axis == 0 else None
            if node.op_type == "Split":
                return list(node.output).index(name) if name in node.output else None
            return None
        name = (
            node.input[0]
            if node.op_type not in ("Mul", "Div") or g.const(node.input[0]) is None
            else node.input[1]
        )
    return None


def _walk_to_split(g: _Graph, name: str):
    for _ in range(4):
        node = g.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Transpose" and _perm(node) == [2, 0, 3, 1, 4]:
            return node
        if node.op_type not in ("Squeeze", "Slice", "Gather", "Split"):
            return None
        name = node.input[0]
    return None


def remove_dead_nodes(model) -> int:
    """Drop nodes none of whose outputs reach a graph output; then unused initializers. -> nodes removed."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for a in node.attribute:  # subgraphs (If/Loop) read outer tensors
                if a.g is not None:
                    needed.update(i for n in a.g.node for i in n.input)
    removed = len(graph.node) - len(keep)
    keep.reverse()
    graph.ClearField("node")
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    graph.ClearField("initializer")
    graph.initializer.extend(inits)
    return removed


def optimize_encoder(src: str | Path, dst: str | Path, num_heads: int, hidden_size: int) -> OptimizeReport:
    """encoder.onnx -> encoder.opt.onnx: attention fusion, then onnxruntime.transformers' ViT fusions."""
    import onnx

    try:
        from onnxruntime.transformers import optimizer
        from onnxruntime.transformers.fusion_options import FusionOptions
    except ImportError as e:  # pragma: no cover - onnxruntime is a core dependency
        raise RuntimeError(f"graph optimisation needs onnxruntime: {install_hint('onnxruntime')}") from e

    report = OptimizeReport()
    model = onnx.load(str(src))
    fuse_vit_attention(model, num_heads, report)
    options = FusionOptions("vit")
    options.enable_attention = False  # done above; its patterns do not match timm's export
    opt = optimizer.optimize_model(
        model,
        model_type="vit",
        num_heads=num_heads,
        hidden_size=hidden_size,
        optimization_options=options,
        opt_level=0,  # python fusions only; ONNX Runtime applies its own at session start
        use_gpu=False,
    )
    report.fused_ops = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    if report.attention_fused:
        report.fused_ops["Attention"] = report.attention_fused
    opt.topological_sort()
    from .onnx import save_onnx

    save_onnx(opt.model, dst)
    return report
