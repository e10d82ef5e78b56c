"""The ops as torch.library custom ops: opcheck, torch.compile(fullgraph=True), and the offline
Triton compile check (every launch compiles for sm_90 with no register spills, vector loads where
the host proved alignment)."""
import os
import subprocess
import sys

import pytest
import torch

import openlora_kernels as olk

from lora_reference import assert_close, make_problem, reference_delta


def _args(p, meta, backend="torch"):
    return meta.tensors(), meta.block_m, backend


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_all_ops(backend):
    if not olk.available_backends("cpu")[backend].usable:
        pytest.skip(olk.available_backends("cpu")[backend].reason)
    p = make_problem(9, 24, [16, 8], 3, 8, ranks="mixed", poison_padding=False)
    meta = olk.build_batch_meta(p.indices, 3)
    mt = meta.tensors()
    torch.library.opcheck(torch.ops.openlora.build_batch_meta.default, (p.indices, 3, meta.block_m))
    torch.library.opcheck(torch.ops.openlora.add_lora.default,
                          (p.y.clone(), p.x, p.a, p.b, p.scalings, p.ranks, *mt, meta.block_m, backend))
    torch.library.opcheck(torch.ops.openlora.lora_shrink.default, (p.x, p.a, p.ranks, *mt, meta.block_m, backend))
    h = olk.lora_shrink(p.x, p.a, meta, p.ranks, backend="torch")
    torch.library.opcheck(torch.ops.openlora.lora_expand.default,
                          (p.y.clone(), h, p.b, p.scalings, p.ranks, *mt, meta.block_m, backend))


class LoRALayer(torch.nn.Module):
    """A linear layer with stacked adapters, as a patched model layer would use the ops."""

    def __init__(self, K, widths, S, R):
        super().__init__()
        self.base = torch.nn.Linear(K, sum(widths), bias=False)
        self.a = [torch.randn(S, R, K) / K ** 0.5 for _ in widths]
        self.b = [torch.randn(S, w, R) / R ** 0.5 for w in widths]
        self.scalings = torch.rand(S)
        self.ranks = torch.randint(0, R + 1, (S,), dtype=torch.int32)

    def forward(self, x, indices):
        y = self.base(x)
        meta = olk.build_batch_meta(indices, self.scalings.shape[0])
        olk.add_lora(y, x, self.a, self.b, meta, self.scalings, self.ranks, backend="torch")
        h = olk.lora_shrink(x, self.a, meta, self.ranks, backend="torch")
        return olk.lora_expand(y, h, self.b, meta, self.scalings, self.ranks, backend="torch")


def test_torch_compile_fullgraph_traces_the_ops():
    torch._dynamo.reset()
    layer = LoRALayer(24, [16, 8], 4, 8)
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for T in (5, 11):
        x = torch.randn(T, 24)
        idx = torch.randint(-1, 4, (T,))
        with torch.no_grad():
            want = layer(x, idx)
            got = compiled(x, idx)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # out-of-range indices still raise inside the compiled graph (the check runs in the op)
    with pytest.raises(IndexError, match="indices: value 9"):
        with torch.no_grad():
            compiled(torch.randn(5, 24), torch.tensor([0, 9, 1, 1, 1]))


def test_compiled_result_matches_reference():
    torch._dynamo.reset()
    p = make_problem(13, 32, [20], 3, 8, ranks="mixed")

    def f(y, x, a, b, idx, sc, rk):
        return olk.add_lora(y, x, a, b, idx, sc, rk, backend="torch")

    y = p.y.clone()
    torch.compile(f, fullgraph=True, backend="aot_eager")(y, p.x, p.a[0], p.b[0], p.indices, p.scalings, p.ranks)
    assert_close(y, p.y.double() + reference_delta(p), torch.float32)


def test_import_touches_no_gpu_and_no_triton():
    code = ("import sys, torch; torch.cuda.is_available = lambda: (_ for _ in ()).throw(RuntimeError('GPU query')); "
            "import openlora_kernels; assert 'triton' not in sys.modules, 'triton imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90_without_spills():
    """tests/triton_compile_check.py: every launch the launchers make compiles to sm_90 cubin with
    no spills (the decode kernel at every rank 8..128, both B layouts, every dtype), and the decode
    and expand kernels hold 16-byte vector loads where the host proved alignment."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])   # this checkout's package
    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    out = subprocess.run([sys.executable, script, "--archs", "90"], capture_output=True, text=True, env=env,
                         timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "0 failed" in out.stdout
