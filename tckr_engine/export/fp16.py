"""fp16 conversion of an fp32 ONNX graph (for GPUs; TensorRT 11 builds strongly typed, so precision must
live in the graph, REFERENCE.md §6).

The installed `onnx` has no float16 converter (it lives in `onnxconverter-common`, not a dependency), so
this is a small, documented cast pass:

1. Every node gets a precision. fp32 for ops in `FP32_OPS` (no fp16 kernels in the ONNX schema) and for
   the "fp32 islands": nodes whose float inputs all come from fp32 tensors or constants, seeded by the
   graph inputs named in `keep_fp32` (the UNet timestep: its sinusoidal embedding and the small time MLP
   stay fp32, as diffusers computes them). Every other node is fp16.
2. Float tensors take their producer's precision; graph inputs and outputs become fp16 unless kept.
3. At each float input slot whose precision differs from what the node needs, a Cast is inserted (once
   per tensor and target); constants (initializers, Constant nodes) are converted instead, keeping an fp32
   copy where fp32 consumers remain. Slots the schema pins to float32 (Resize scales) stay fp32.
4. fp16 nodes get their float attributes converted (Cast `to`, ConstantOfShape `value`).
The result is re-checked with `onnx.checker` and strict shape inference by the exporter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tckr_engine.errors import TckrError

log = logging.getLogger(__name__)

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
FP32_OPS = frozenset({"Range", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"})
FP32_SLOTS = {"Resize": {1, 2}, "Upsample": {1}}  # op -> input indices typed tensor(float) only
FP16_MAX = float(np.finfo(np.float16).max)
STRIP_BYTES = 4096  # float constants larger than this are weights: detached during type inference


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every named tensor of the (fp32) graph, from shape inference.

    Weights are detached while inference runs: it serialises the model, and an SD UNet in fp32 (3.4 GB)
    is beyond protobuf's 2 GB limit. Types do not depend on weight values; small constants (shapes) stay.
    """
    stash = {}
    for t in model.graph.initializer:
        if t.data_type == FLOAT and len(t.raw_data) > STRIP_BYTES:
            stash[t.name] = t.raw_data
            t.ClearField("raw_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # onnx raises several unrelated types here
        raise TckrError(f"shape inference failed before fp16 conversion: {str(e).splitlines()[0]}") from None
    finally:
        for t in model.graph.initializer:
            if t.name in stash:
                t.raw_data = stash[t.name]
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for vi in (*g.input, *g.value_info, *g.output):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def _to_half(array: np.ndarray, name: str) -> np.ndarray:
    big = np.abs(array[np.isfinite(array)]).max(initial=0.0)
    if big > FP16_MAX:
        log.warning("constant %s has values up to %.3g, beyond fp16; they saturate", name, big)
    return np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16)


def convert_to_fp16(model: onnx.ModelProto, keep_fp32: Iterable[str] = ()) -> onnx.ModelProto:
    """Convert the fp32 `model` to fp16 in place (no copy: an SD UNet is GBs) and return it."""
    src = model
    g = src.graph
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute
    ):
        raise TckrError("fp16 conversion does not support graphs with control flow (If/Loop/Scan)")
    types = _elem_types(src)
    keep = set(keep_fp32)

    # Constants by name: initializers and Constant nodes holding a float tensor (converted lazily).
    consts: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer if t.data_type == FLOAT}
    for node in g.node:
        if node.op_type == "Constant" and types.get(node.output[0]) == FLOAT:
            consts[node.output[0]] = next(a.t for a in node.attribute if a.name == "value")

    # 1-2. Precision of every float tensor (None: not a float tensor).
    prec: dict[str, int] = {}
    for vi in g.input:
        if types.get(vi.name) == FLOAT:
            prec[vi.name] = FLOAT if vi.name in keep else HALF
    node_prec: list[int] = []
    for node in g.node:
        if node.op_type == "Constant":
            node_prec.append(FLOAT)
            continue
        float_in = [i for i in node.input if i and types.get(i) == FLOAT]
        dynamic = [i for i in float_in if i not in consts]
        island = bool(dynamic) and all(prec.get(i) == FLOAT for i in dynamic)
        p = FLOAT if node.op_type in FP32_OPS or island else HALF
        node_prec.append(p)
        for o in node.output:
            if types.get(o) == FLOAT:
                prec[o] = p

    # 3-4. Rewrite: casts and constant copies at mismatched slots, attributes of fp16 nodes.
    new_nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}
    half_consts: dict[str, str] = {}
    used_fp32_consts: set[str] = set()

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            out = f"{name}__to_{'fp16' if to == HALF else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"{out}__cast"))
            casts[key] = out
        return casts[key]

    for node, p in zip(g.node, node_prec, strict=True):
        if node.op_type == "Constant":
            new_nodes.append(node)
            continue
        for idx, name in enumerate(node.input):
            if not name or types.get(name) != FLOAT:
                continue
            want = FLOAT if p == FLOAT or idx in FP32_SLOTS.get(node.op_type, ()) else HALF
            if name in consts:
                if want == HALF:
                    if name not in half_consts:
                        half_consts[name] = f"{name}__fp16"
                    node.input[idx] = half_consts[name]
                else:
                    used_fp32_consts.add(name)
            elif prec.get(name, FLOAT) != want:
                node.input[idx] = cast(name, want)
        if p == HALF:
            for a in node.attribute:
                if node.op_type == "Cast" and a.name == "to" and a.i == FLOAT:
                    a.i = HALF
                if node.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == FLOAT:
                    a.t.CopyFrom(
                        numpy_helper.from_array(_to_half(numpy_helper.to_array(a.t), a.name), a.t.name)
                    )
        new_nodes.append(node)

    # Graph outputs: fp16 unless their producer is fp32 (then they stay fp32, as declared).
    for vi in g.output:
        if prec.get(vi.name) == HALF:
            vi.type.tensor_type.elem_type = HALF
    for vi in g.input:
        if prec.get(vi.name) == HALF:
            vi.type.tensor_type.elem_type = HALF

    # Constants: fp16 copies where needed; fp32 originals only where still used.
    outputs = {o.name for o in g.output}
    kept_inits = [
        t for t in g.initializer if t.data_type != FLOAT or t.name in used_fp32_consts or t.name in outputs
    ]
    half_inits = []
    for name, new in half_consts.items():
        proto = consts[name]
        half_inits.append(numpy_helper.from_array(_to_half(numpy_helper.to_array(proto), name), new))
        if name not in used_fp32_consts and name not in outputs:
            proto.ClearField("raw_data")  # dropped below; freeing it now lowers the peak memory
    const_nodes = [n for n in new_nodes if n.op_type == "Constant"]
    unused_const_nodes = {
        n.output[0] for n in const_nodes if n.output[0] in consts and n.output[0] not in used_fp32_consts
    }
    del g.node[:]
    g.node.extend(n for n in new_nodes if not (n.op_type == "Constant" and n.output[0] in unused_const_nodes))
    del g.initializer[:]
    g.initializer.extend(kept_inits + half_inits)
    del g.value_info[:]  # stale types; the exporter re-runs shape inference
    n_half = sum(1 for p in node_prec if p == HALF)
    log.info(
        "fp16 pass: %d of %d nodes fp16, %d casts inserted, %d constants converted",
        n_half,
        len(node_prec),
        len(casts),
        len(half_inits),
    )
    return src
