"""ONNX export of one nn.Module with named inputs/outputs, a dynamic batch axis, checked and simplified.

Works on plain modules and example inputs only (no synthgen imports): the engine side decides which
module and which inputs. Two exporters:
  "torchscript"  torch.onnx's tracing exporter: ~1 s for the tiny presets, the default.
  "dynamo"       torch.export-based exporter (needs onnxscript): slower to export, optimises the graph.
  "auto"         torchscript, falling back to dynamo when tracing fails (e.g. a shape read off a tensor
                 inside a Python-level op, which the tracer cannot turn into a constant).
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch
from torch import nn

EXPORTERS = ("auto", "torchscript", "dynamo")
OPSET = 17  # LayerNormalization is a native op from 17 on; every EP we target supports it


def export_onnx(
    module: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: str | Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool = True,
    exporter: str = "auto",
    opset: int = OPSET,
    simplify_graph: bool = True,
) -> Path:
    """Export `module(*example_inputs)` to `path`; axis 0 of every input/output is 'batch' when dynamic.

    The tracing exporter's graph is then simplified (`simplify`: about half the nodes of the DiT, UNet,
    VAE and ViT graphs go, outputs bit-identical under ONNX Runtime); the dynamo exporter optimises its own.

    The module is exported in eval mode (the OUTERMOST module: the tracing exporter restores the outer
    module's train flag recursively) and in the dtype of its parameters; convert precision afterwards
    with `synthgen.export.precision.convert_precision`. Returns the path; onnx.checker has passed on it.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter {exporter!r} is not one of {EXPORTERS}")
    if len(input_names) != len(example_inputs):
        raise ValueError(f"{len(input_names)} input names for {len(example_inputs)} example inputs")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if exporter == "auto":
        try:
            return export_onnx(module, example_inputs, path, input_names, output_names, dynamic_batch, "torchscript",
                               opset, simplify_graph)
        except (torch.onnx.errors.OnnxExporterError, RuntimeError):
            exporter = "dynamo"
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-level shape checks on fixed sizes
            if exporter == "torchscript":
                axes = {n: {0: "batch"} for n in [*input_names, *output_names]} if dynamic_batch else None
                torch.onnx.export(
                    module, example_inputs, str(path), input_names=input_names, output_names=output_names,
                    dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True,
                )
            else:
                shapes = None
                if dynamic_batch:
                    batch = torch.export.Dim("batch", min=1, max=4096)
                    params = list(inspect.signature(module.forward).parameters)[: len(example_inputs)]
                    shapes = {p: {0: batch} for p in params}
                torch.onnx.export(
                    module, example_inputs, str(path), input_names=input_names, output_names=output_names,
                    dynamic_shapes=shapes, opset_version=max(opset, 18), dynamo=True, optimize=True, verbose=False,
                    external_data=False,
                )
    finally:
        module.train(was_training)
    if exporter == "torchscript" and simplify_graph:
        simplify(path)
    check_onnx(path)
    return path


def check_onnx(path: str | Path) -> None:
    """onnx.checker with full type/shape checks; raises onnx.checker.ValidationError."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def io_names(path: str | Path) -> tuple[list[str], list[str]]:
    """(input names, output names) of an ONNX file, initializers excluded."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits], [o.name for o in model.graph.output]


def simplify(path: str | Path) -> bool:
    """Constant-fold and drop dead nodes in place with onnxscript's optimizer when it is installed.

    Returns True when the graph was rewritten. The tracing exporter leaves shape arithmetic
    (Shape/Gather/Unsqueeze/Concat chains) and Constant nodes that this folds; ONNX Runtime and TensorRT
    would fold most of it again at load, so this mainly makes the file smaller, readable, and quicker to
    parse and convert (the mixed-precision pass walks every node). Node names, and with them the name
    scopes that pass keys on, are kept.
    """
    try:
        import onnx
        import onnxscript.optimizer
    except ImportError:
        return False
    model = onnx.load(str(path))
    try:
        optimized = onnxscript.optimizer.optimize(model)
        onnx.checker.check_model(optimized)
    except Exception as e:  # noqa: BLE001 - a third-party optimizer's failure must not cost the export
        warnings.warn(f"ONNX simplification of {path} failed and was skipped ({type(e).__name__}: {e})",
                      stacklevel=2)
        return False
    onnx.save(optimized, str(path))
    return True
