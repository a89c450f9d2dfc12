"""Mixed-precision conversion of an ONNX graph: compute-heavy ops in fp16/bf16, sensitive ops in fp32.

Our own pass rather than onnxconverter-common's `float16` (it installs, but fails on the graphs the
exporter writes for DiT/UNet/VAE: Cast and Identity-of-initializer nodes come out with mismatched types).

The rule is simple enough to be correct by construction:
  * a node runs in low precision when its op is in `LOW_OPS` (matmuls, convs, elementwise arithmetic,
    activations, data movement) and it is not inside a blocked name scope (the timestep embedding:
    `t * freqs` of t ~ 1000 has a resolution of 0.5 in fp16, which scrambles the sinusoid's phase);
  * every other node (normalizations, softmax, reductions, exp/sin/cos/sqrt/pow, casts, shape logic)
    keeps its original types;
  * where a value crosses between the two worlds a Cast is inserted; float initializers and constants
    used only by low nodes are stored in low precision (this halves the weights on disk);
  * graph inputs and outputs keep float32, so callers never see the change.
ONNX Runtime and TensorRT remove back-to-back casts when they optimize the graph.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

LOW_OPS = frozenset({
    "MatMul", "Gemm", "Conv", "ConvTranspose", "Add", "Sub", "Mul", "Div", "Neg", "Relu", "Sigmoid", "Tanh",
    "Erf", "Gelu", "LeakyRelu", "HardSigmoid", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
    "Concat", "Split", "Slice", "Gather", "Expand", "Where", "Resize", "MaxPool", "AveragePool", "Tile",
})
# Ops whose float inputs beyond the first are parameters, not data (Resize's roi and scales).
DATA_INPUTS_ONLY_FIRST = frozenset({"Resize"})
# Numerically sensitive ops listed for documentation; anything outside LOW_OPS stays fp32 anyway.
SENSITIVE_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
                 "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Exp", "Log", "Sin", "Cos")
TIMESTEP_SCOPES = ("t_embedder", "time_proj", "time_embedding", "timestep")
LOW_PRECISIONS = ("fp16", "bf16")


def convert_precision(model, precision: str = "fp16", block_scopes: tuple[str, ...] = TIMESTEP_SCOPES):
    """Return a new ModelProto with the LOW_OPS of `model` in fp16 or bf16 and float32 IO."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if precision not in LOW_PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {LOW_PRECISIONS}")
    low = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
    FLOAT = TensorProto.FLOAT
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    types = _elem_types(graph)
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def is_low(node) -> bool:
        if node.op_type not in LOW_OPS or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                              for a in node.attribute):
            return False
        where = (node.name + " " + " ".join(p.value for p in node.metadata_props)).lower()
        return not any(scope in where for scope in block_scopes)

    low_nodes = {id(n) for n in graph.node if is_low(n)}

    def wants_low(node, index: int) -> bool:
        if id(node) not in low_nodes or types.get(node.input[index]) != FLOAT:
            return False
        return index == 0 or node.op_type not in DATA_INPUTS_ONLY_FIRST

    # Values whose producer now makes them low precision.
    produced_low = {o for n in graph.node if id(n) in low_nodes for o in n.output if types.get(o) == FLOAT}
    # Float initializers / constants read only as low data are stored low.
    def only_low_readers(name: str) -> bool:
        readers = consumers.get(name, [])
        return bool(readers) and all(wants_low(r, i) for r in readers for i, x in enumerate(r.input) if x == name)

    graph_outputs = {o.name for o in graph.output}
    for init in graph.initializer:
        if init.data_type == FLOAT and only_low_readers(init.name) and init.name not in graph_outputs:
            init.CopyFrom(_cast_tensor(numpy_helper.to_array(init), low, init.name))
            produced_low.add(init.name)
    for node in graph.node:
        if node.op_type == "Constant" and types.get(node.output[0]) == FLOAT and only_low_readers(node.output[0]):
            attr = next((a for a in node.attribute if a.name == "value"), None)
            if attr is not None:
                attr.t.CopyFrom(_cast_tensor(numpy_helper.to_array(attr.t), low, attr.t.name))
                produced_low.add(node.output[0])

    # Graph outputs produced low: the producer writes NAME__low, a Cast restores float32 NAME.
    renamed = {name: f"{name}__{precision}" for name in graph_outputs if name in produced_low}
    casts: dict[tuple[str, int], str] = {}
    new_nodes = []

    def as_type(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            casts[key] = f"{name}__to_{'low' if to == low else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=to, name=f"cast_{len(casts)}"))
        return casts[key]

    for node in graph.node:
        for i, name in enumerate(node.input):
            if not name:
                continue
            current = renamed.get(name, name)
            is_low_value = name in produced_low
            if wants_low(node, i) and not is_low_value:
                current = as_type(current, low)
            elif not wants_low(node, i) and is_low_value:
                current = as_type(current, FLOAT)
            node.input[i] = current
        for i, name in enumerate(node.output):
            node.output[i] = renamed.get(name, name)
        new_nodes.append(node)
    for name, low_name in renamed.items():
        new_nodes.append(helper.make_node("Cast", [low_name], [name], to=FLOAT, name=f"cast_out_{name}"))
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    graph.ClearField("value_info")  # types changed; runtimes re-infer
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model


def _elem_types(graph) -> dict[str, int]:
    types = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def _cast_tensor(array: np.ndarray, to: int, name: str):
    from onnx import TensorProto, helper, numpy_helper

    if to == TensorProto.FLOAT16:
        return numpy_helper.from_array(array.astype(np.float16), name)
    # bfloat16: round-to-nearest-even on the top 16 bits of the float32 pattern.
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return helper.make_tensor(name, TensorProto.BFLOAT16, array.shape, rounded.tobytes(), raw=True)
