"""Deployment without Triton (decompose.py): torch.export's run_decompositions() gives aten
graphs, both ONNX exporters export converted and fused models, onnxruntime agrees with the
eager model; torch.compile still keeps triton_bn's op (the decomposition is for export only).
The ONNX tests skip without onnx, onnxscript and onnxruntime."""
import copy
import io

import torch
import torch.nn.functional as F
from torch import nn

import triton_bn
from tests._optional import optional
from tests.reference import assert_close, random_input, random_statistics


class _Net(nn.Module):
    """Every fused activation, a residual add, a plain BatchNorm and a BatchNorm1d."""

    def __init__(self, c=3):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(5))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c) for _ in range(6))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * 16, 4), nn.BatchNorm1d(4))

    def forward(self, x):
        y = F.silu(self.bns[0](self.convs[0](x)))
        y = F.hardswish(self.bns[1](self.convs[1](y)))
        y = F.leaky_relu(self.bns[2](self.convs[2](y)), 0.1)
        y = F.elu(self.bns[3](self.convs[3](y)))
        y = F.relu(self.bns[4](self.convs[4](y)) + x)
        return self.head(self.bns[5](y))


def _model_and_input():
    torch.manual_seed(0)
    model = random_statistics(_Net(), seed=1)
    return model.eval(), random_input((2, 3, 4, 4), torch.float32, "cpu", seed=2)


def _triton_ops(graph: torch.fx.Graph) -> list:
    return [str(n.target) for n in graph.nodes if n.op == "call_function" and "triton_bn" in str(n.target)]


def _compiled_graph_ops(layer, x) -> list:
    """The triton_bn ops of torch.compile's (AOT) forward graph of ``layer``."""
    from torch._functorch.aot_autograd import aot_module_simplified
    graphs = []

    def backend(gm, inputs):
        def keep(graph_module, _):
            graphs.append(graph_module)
            return graph_module
        return aot_module_simplified(gm, inputs, fw_compiler=keep)

    torch._dynamo.reset()
    assert torch.equal(torch.compile(layer, backend=backend, fullgraph=True)(x), layer(x))
    return _triton_ops(graphs[0].graph)


def test_run_decompositions_gives_an_aten_graph():
    model, x = _model_and_input()
    fused = triton_bn.fuse_model(model).eval()
    program = torch.export.export(fused, (x,))
    assert _triton_ops(program.graph), "export keeps the op (it still runs the kernels)"
    decomposed = program.run_decompositions()
    assert not _triton_ops(decomposed.graph), _triton_ops(decomposed.graph)
    targets = {str(n.target) for n in decomposed.graph.nodes}
    assert "aten._native_batch_norm_legit_no_training.default" in targets and "aten.add.Tensor" in targets
    assert_close(decomposed.module()(x), model(x), torch.float32, "decomposed output")
    # The decomposition answers only under export: torch.compile's graph keeps the op (its kernels).
    assert _compiled_graph_ops(fused.get_submodule("bns.0"), x) == ["triton_bn.forward_eval.default"]


def _onnxruntime_output(model_bytes: bytes, x: torch.Tensor) -> torch.Tensor:
    ort = optional("onnxruntime")
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_onnx_dynamo_export_matches_the_eager_model():
    optional("onnx"), optional("onnxscript")
    model, x = _model_and_input()
    ours = triton_bn.fuse_model(model).eval()
    program = torch.onnx.export(ours, (x,), dynamo=True, verbose=False)
    ops = {node.op_type for node in program.model_proto.graph.node}
    assert not any("triton" in op.lower() for op in ops), ops
    assert_close(_onnxruntime_output(program.model_proto.SerializeToString(), x), model(x), torch.float32, "onnx")


def test_onnx_legacy_export_matches_the_eager_model():
    """dynamo=False traces with torch.jit, which records torch's ops only: the layers compute
    with them while it traces (eager.computes)."""
    optional("onnx")
    model, x = _model_and_input()
    converted = triton_bn.convert_model(copy.deepcopy(model)).eval()
    buffer = io.BytesIO()
    torch.onnx.export(converted, (x,), buffer, dynamo=False)
    assert_close(_onnxruntime_output(buffer.getvalue(), x), model(x), torch.float32, "onnx (legacy)")
