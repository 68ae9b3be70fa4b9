"""The batch-1 GEMV op (pipeline/model/gemv.py): its reference path everywhere, its Triton kernel on CUDA."""

import pytest
import torch

from pipeline.model import gemv, quant


def _case(n: int, k: int, fmt: str | None, device: str = "cpu"):
    torch.manual_seed(0)
    w = torch.randn(n, k, device=device) * 0.02
    x = torch.randn(1, k, device=device).bfloat16()
    if fmt is None:
        return x, w.bfloat16(), torch.ones(n, device=device)
    return (x, *quant.quantize_weight(w, fmt))


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", None])
def test_op_equals_the_dequantized_matmul(fmt):
    x, w, s = _case(48, 64, fmt)
    expected = (x.float() @ quant.dequantize_weight(w, s).t()).bfloat16()
    out = gemv.gemv(x, w, s)
    assert out.shape == (1, 48) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=1e-2, rtol=1e-2)


def test_op_compiles_into_one_graph():
    # fullgraph: the custom op (with its fake) traces; a missing or wrong fake would break the compiled step.
    x, w, s = _case(32, 64, "int8")
    compiled = torch.compile(lambda a: gemv.gemv(a, w, s) * 2, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x), gemv.gemv(x, w, s) * 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", None])
@pytest.mark.parametrize("n,k", [(6144, 4096), (100, 1000), (4096, 14336)])
def test_kernel_equals_reference_on_cuda(fmt, n, k):
    x, w, s = _case(n, k, fmt, "cuda")
    for config in (None, (8, 128, 4, 2), (32, 1024, 8, 4)):  # ragged N and K against every block size
        torch.testing.assert_close(gemv.launch(x, w, s, config=config).float(), gemv.reference(x, w, s).float(),
                                   atol=2e-2, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["int8-wo", "fp8-wo"])
def test_quantized_linear_routes_one_row_to_the_kernel_on_cuda(precision):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False)).cuda().bfloat16()
    quant.quantize_(model, precision)
    layer = model[0]
    x = torch.randn(1, 1, 256, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    expected = quant._dequant_matmul(x, layer.weight, layer.scale)
    for _ in range(3):  # warm-up, record, replay
        out = compiled(x).clone()
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=1e-2)
