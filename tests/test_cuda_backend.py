"""backend="cuda": the csrc/ kernels behind the core contract.

CPU tests (run everywhere): the built binding imports and reports its archs and source hash;
the launch plans the binding would make (kernel choice, grids, 16-byte-load legality, errors);
the Python argument packing agrees with what the binding parses; the build helpers (arch parsing,
cache location, source hash, lock, on-first-use build with recorded failures); and a launch on a
machine without a GPU raises CudaError carrying the CUDA error string.

GPU tests (``-m gpu``): parity against a float64 reference over the core cases (T = 1 and odd;
K, N not multiples of any block; every row -1; one adapter; distinct adapters; heterogeneous
ranks including 0, with NaN weights beyond each rank; strided x, aligned and not; multi-slice with
unequal widths, more slices than one launch takes; per-slice ranks) for fp16, bf16 and fp32 and
every block_m, plus CUDA-graph capture and replay with indices changed between replays, a
non-default stream, and row offsets past the int32 range.

Build the binding for the CPU tests with ``bash .ci/compile_cuda.sh`` (or
``OPENLORA_CUDA_ARCHS=90 python setup.py build_ext --inplace``); without it they skip.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import openlora_kernels as olk
from openlora_kernels.ops import cuda_build, cuda_ext

HAS_GPU = torch.cuda.is_available()


def _binding():
    try:
        return importlib.import_module("openlora_kernels.ops._cuda_sgmv")
    except ImportError as e:
        pytest.skip(f"the CUDA extension is not built here ({e}); build it with `bash .ci/compile_cuda.sh`")


@pytest.fixture(scope="module")
def binding():
    return _binding()


# ====================================================================== binding (CPU, built)


def test_binding_reports_archs(binding):
    archs = binding.archs()
    assert archs and all(isinstance(a, int) and a >= 80 for a in archs), archs
    info = binding.build_info()
    assert info["sass_archs"] == archs
    assert info["ptx_archs"] == [max(archs)]
    # nvcc's own list for launchers.cu (e.g. "900" or "800,890,900") names the same archs.
    assert sorted(int(a) // 10 for a in info["nvcc_arch_list"].split(",")) == archs
    assert binding.MAX_SLICES == cuda_ext.MAX_SLICES


def test_binding_built_from_these_sources(binding):
    src = cuda_build.source_dir()
    assert src is not None
    assert binding.SOURCE_HASH == cuda_build.source_hash(src), \
        "the built extension is stale: rebuild it (bash .ci/compile_cuda.sh)"


# ------------------------------------------------------------------------- launch plans


def _problem(T=6, K=64, R=16, S=3, widths=(48,), dtype=torch.bfloat16, block_m=None, idx=None):
    x = torch.randn(T, K, dtype=dtype)
    y = torch.randn(T, sum(widths), dtype=dtype)
    a = [torch.randn(S, R, K, dtype=dtype) for _ in widths]
    b = [torch.randn(S, w, R, dtype=dtype) for w in widths]
    idx = torch.arange(T) % S if idx is None else idx
    meta = olk.build_batch_meta(idx, S, block_m=block_m)
    return x, y, a, b, meta


def _plan(binding, op, x, y, a, b, meta, h=None, sm=132, ranks=None):
    S, R, K = a[0].shape
    args = cuda_ext.pack_args(meta=meta, K=K, R=R, S=S, ranks=ranks, x=x if op != cuda_ext.OP_EXPAND else None,
                              y=y if op != cuda_ext.OP_SHRINK else None, h=h,
                              scalings=torch.ones(S) if op != cuda_ext.OP_SHRINK else None)
    slices = cuda_ext.pack_slices(a if op != cuda_ext.OP_EXPAND else None, b if op != cuda_ext.OP_SHRINK else None,
                                  0, len(a))
    return binding.plan(op, cuda_ext.dtype_code(x.dtype), meta.block_m, args, slices, sm)


@pytest.mark.parametrize("block_m", [1, 2, 4])
def test_plan_decode_is_one_fused_cuda_core_launch(binding, block_m):
    x, y, a, b, meta = _problem(T=5, widths=(512, 128, 128), block_m=block_m)
    p = _plan(binding, cuda_ext.OP_FUSED, x, y, a, b, meta)
    assert p["kernel"] == "simt_fused" and p["bm"] == block_m and p["threads"] == 256
    G, chunks, n = p["grid"]
    assert G == meta.num_tiles and n == 3
    assert p["cols_per_chunk"] % 32 == 0 and chunks * p["cols_per_chunk"] >= 512 > (chunks - 1) * p["cols_per_chunk"]
    assert p["cols_per_chunk"] >= 256 or chunks == 1  # never split below 256 columns per CTA
    assert p["smem_bytes"] == block_m * 16 * 4  # the [BM, R] fp32 intermediate
    assert p["vec_k"] and p["vec_r"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_plan_prefill_uses_tensor_cores(binding, dtype, block_m):
    x, y, a, b, meta = _problem(T=40, K=4096, widths=(300, 20), dtype=dtype, block_m=block_m)
    h = torch.zeros(2, 40, 16)
    ps = _plan(binding, cuda_ext.OP_SHRINK, x, y, a, b, meta, h=h)
    assert ps["kernel"] == "mma_shrink" and ps["bm"] == block_m and ps["threads"] == 128
    G, rchunks, z = ps["grid"]
    assert G == meta.num_tiles and rchunks == 1 and z == 2 * ps["split_k"]
    assert ps["k_per_split"] % 64 == 0 and ps["split_k"] * ps["k_per_split"] >= 4096
    assert (ps["split_k"] - 1) * ps["k_per_split"] < 4096
    assert ps["split_k"] > 1  # a few tiles over a long K: split to fill the GPU
    pe = _plan(binding, cuda_ext.OP_EXPAND, x, y, a, b, meta, h=h)
    assert pe["kernel"] == "mma_expand" and pe["grid"] == (meta.num_tiles, 3, 2)  # cdiv(300, 128) column tiles


def test_plan_float32_prefill_runs_cuda_cores(binding):
    x, y, a, b, meta = _problem(T=40, dtype=torch.float32, block_m=16)
    p = _plan(binding, cuda_ext.OP_SHRINK, x, y, a, b, meta, h=torch.zeros(1, 40, 16))
    assert p["kernel"] == "simt_shrink" and p["bm"] == 4


def test_plan_many_tiles_do_not_split(binding):
    x, y, a, b, meta = _problem(T=4096, K=4096, widths=(4096,), block_m=64)  # 66 tiles
    p = _plan(binding, cuda_ext.OP_SHRINK, x, y, a, b, meta, h=torch.zeros(1, 4096, 16), sm=16)
    assert p["split_k"] == 1 and p["grid"][2] == 1
    assert _plan(binding, cuda_ext.OP_SHRINK, x, y, a, b, meta, h=torch.zeros(1, 4096, 16), sm=132)["split_k"] == 4
    x, y, a, b, meta = _problem(T=1024, K=64, widths=(4096,), block_m=1)
    p = _plan(binding, cuda_ext.OP_FUSED, x, y, a, b, meta)
    assert p["grid"][1] == 1  # 1024 tiles already fill the GPU: no column chunks


def test_plan_vector_loads_need_alignment(binding):
    x, y, a, b, meta = _problem(K=64)
    buf = torch.randn(6, 72, dtype=x.dtype)
    p = _plan(binding, cuda_ext.OP_FUSED, buf[:, 1:65], y, a, b, meta)   # x starts 2 bytes in
    assert not p["vec_k"] and p["vec_r"]
    assert _plan(binding, cuda_ext.OP_FUSED, buf[:, 8:72], y, a, b, meta)["vec_k"]  # 16 bytes in, 144 B rows
    odd = torch.randn(6, 74, dtype=x.dtype)[:, 8:72]                     # 148-byte rows
    assert not _plan(binding, cuda_ext.OP_FUSED, odd, y, a, b, meta)["vec_k"]
    x2, y2, a2, b2, meta2 = _problem(K=60)                                  # K % 8 != 0
    assert not _plan(binding, cuda_ext.OP_FUSED, x2, y2, a2, b2, meta2)["vec_k"]
    x3, y3, a3, b3, meta3 = _problem(R=12)                                   # B rows of 24 bytes
    assert not _plan(binding, cuda_ext.OP_FUSED, x3, y3, a3, b3, meta3)["vec_r"]
    bt = [B.transpose(1, 2).contiguous().transpose(1, 2) for B in b]         # rank dim strided
    assert not _plan(binding, cuda_ext.OP_FUSED, x, y, a, bt, meta)["vec_r"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_plan_pool_layout_expand_reads_b_by_16_byte_vectors_along_n(binding, dtype):
    """The tensor-core expand on the pool's rank-major B ([S, R, N] storage seen as [S, N, R]):
    16-byte copies along N (vec_n: the kernel keeps the tile as [rank][n] and reads it through
    ldmatrix .trans; .ci/compile_cuda.sh checks the SASS), not 2-byte loads strided by N; y's
    paired 4-byte read-modify-write (vec_y) where its columns allow."""
    x, y, a, b, meta = _problem(T=40, K=256, widths=(256, 64, 64), dtype=dtype, block_m=16)
    h = torch.zeros(3, 40, 16)
    pool = [B.transpose(1, 2).contiguous().transpose(1, 2) for B in b]
    assert pool[0].stride(1) == 1
    pe = _plan(binding, cuda_ext.OP_EXPAND, x, y, a, pool, meta, h=h)
    assert pe["kernel"] == "mma_expand" and pe["vec_n"] and not pe["vec_r"] and pe["vec_y"]
    std = _plan(binding, cuda_ext.OP_EXPAND, x, y, a, b, meta, h=h)
    assert std["vec_r"] and not std["vec_n"]
    # misaligned rank rows (N_i odd): neither vector path; y of odd first columns: no pairs
    x2, y2, a2, b2, meta2 = _problem(T=40, K=256, widths=(255,), dtype=dtype, block_m=16)
    odd = [B.transpose(1, 2).contiguous().transpose(1, 2) for B in b2]
    p2 = _plan(binding, cuda_ext.OP_EXPAND, x2, y2, a2, odd, meta2, h=torch.zeros(1, 40, 16))
    assert not p2["vec_n"] and not p2["vec_r"]
    ybuf = torch.randn(40, 258, dtype=dtype)
    assert not _plan(binding, cuda_ext.OP_EXPAND, x, ybuf[:, 1:257], a[:1], pool[:1], meta, h=h[:1])["vec_y"]
    assert not _plan(binding, cuda_ext.OP_FUSED, x, y, a, pool, meta)["vec_n"]        # expand only


def test_plan_empty_launches_nothing(binding):
    x, y, a, b, meta = _problem(idx=torch.full((6,), -1))
    assert _plan(binding, cuda_ext.OP_FUSED, x[:, :0], y, [A[:, :, :0] for A in a], b, meta)["grid"] == (0, 0, 0)
    x, y, a, b, meta = _problem(R=0)
    assert _plan(binding, cuda_ext.OP_FUSED, x, y, a, b, meta)["grid"] == (0, 0, 0)


def test_plan_rejects_bad_arguments(binding):
    x, y, a, b, meta = _problem(widths=(8,) * 9)
    S, R, K = a[0].shape
    args = cuda_ext.pack_args(meta=meta, K=K, R=R, S=S, ranks=None, x=x, y=y, scalings=torch.ones(S))
    slices = cuda_ext.pack_slices(a, b, 0, 9)
    with pytest.raises(ValueError, match="slices"):
        binding.plan(0, 1, meta.block_m, args, slices, 132)
    with pytest.raises(ValueError, match="dtype"):
        binding.plan(0, 7, meta.block_m, args, slices[:2], 132)
    with pytest.raises(ValueError, match="block_m"):
        binding.plan(0, 1, 8, args, slices[:2], 132)
    with pytest.raises(ValueError, match="missing key 'T'"):
        binding.plan(0, 1, meta.block_m, {k: v for k, v in args.items() if k != "T"}, slices[:2], 132)
    with pytest.raises(ValueError, match="10 integers"):
        binding.plan(0, 1, meta.block_m, args, [slices[0][:9]], 132)
    with pytest.raises(ValueError, match="y, scalings: null pointer"):
        binding.plan(0, 1, meta.block_m, {**args, "y": 0}, slices[:2], 132)
    with pytest.raises(ValueError, match="R: the CUDA-core kernels support ranks up to 2048"):
        binding.plan(0, 1, meta.block_m, {**args, "R": 4096}, slices[:2], 132)


@pytest.mark.skipif(HAS_GPU, reason="checks the error path of a machine without a GPU")
def test_launch_without_gpu_raises_cuda_error(binding):
    x, y, a, b, meta = _problem()
    S, R, K = a[0].shape
    args = cuda_ext.pack_args(meta=meta, K=K, R=R, S=S, ranks=None, x=x, y=y, scalings=torch.ones(S))
    with pytest.raises(binding.CudaError, match=r"openlora_kernels CUDA error in cudaGetDevice: cudaError\w+ \(.+\)"):
        binding.run(0, 1, meta.block_m, args, cuda_ext.pack_slices(a, b, 0, 1), 0)
    assert issubclass(binding.CudaError, RuntimeError)


# ================================================================ Python side (CPU, always)


def test_pack_slices_and_args():
    x, y, a, b, meta = _problem(T=4, K=32, R=8, S=2, widths=(16, 4, 4), dtype=torch.float16)
    y = torch.randn(8, 48, dtype=torch.float16)[::2, 4:28]  # strided y
    slices = cuda_ext.pack_slices(a, b, 1, 2)
    assert slices[0] == (a[1].data_ptr(), 8 * 32, 32, 1, b[1].data_ptr(), 4 * 8, 8, 1, 4, 16)
    assert slices[1][-2:] == (4, 20)
    assert cuda_ext.pack_slices(None, b, 0, 1)[0][:4] == (0, 0, 0, 0)
    assert cuda_ext.pack_slices(a, None, 0, 1)[0][4:] == (0, 0, 0, 0, 0, 0)
    ranks = torch.tensor([[8, 0], [4, 8], [1, 2]], dtype=torch.int64)
    args = cuda_ext.pack_args(meta=meta, K=32, R=8, S=2, ranks=ranks[:, :], x=x, y=y, scalings=torch.ones(2))
    assert (args["sy_t"], args["sy_n"]) == (96, 1)
    assert (args["sr_n"], args["sr_s"], args["ranks_i64"], args["has_ranks"]) == (2, 1, 1, 1)
    assert args["G"] == meta.num_tiles and args["T"] == 4 and args["h"] == 0
    assert args["tile_info"] == meta.tile_info.data_ptr()
    r1 = torch.tensor([8, 3], dtype=torch.int32)
    args = cuda_ext.pack_args(meta=meta, K=32, R=8, S=2, ranks=r1, x=x)
    assert (args["sr_n"], args["sr_s"], args["ranks_i64"]) == (0, 1, 0) and args["y"] == 0
    assert all(isinstance(v, int) for v in args.values())


def test_slice_groups_and_dtypes():
    assert cuda_ext.slice_groups(1) == [(0, 1)]
    assert cuda_ext.slice_groups(8) == [(0, 8)]
    assert cuda_ext.slice_groups(17) == [(0, 8), (8, 8), (16, 1)]
    assert [cuda_ext.dtype_code(d) for d in (torch.float16, torch.bfloat16, torch.float32)] == [0, 1, 2]
    with pytest.raises(TypeError, match="x: dtype torch.float64 is not supported by the CUDA backend"):
        cuda_ext.dtype_code(torch.float64)


@pytest.mark.skipif(HAS_GPU, reason="checks the reason given on a machine without a GPU")
def test_unavailable_without_gpu():
    assert cuda_ext.unavailable_reason() == "no CUDA device is available"
    assert olk.available_backends("cuda")["cuda"].reason == "no CUDA device is available"
    x, y, a, b, meta = _problem()
    with pytest.raises(olk.BackendUnavailableError, match="cuda"):
        olk.add_lora(y, x, a, b, meta, torch.ones(3), backend="cuda")


# =========================================================================== cuda_build (CPU)


def test_parse_archs():
    assert cuda_build.parse_archs("80;89;90") == [80, 89, 90]
    assert cuda_build.parse_archs("9.0, 8.0 sm_86 compute_89 90a 90") == [80, 86, 89, 90]
    with pytest.raises(ValueError, match="below sm_80"):
        cuda_build.parse_archs("75;80")
    with pytest.raises(ValueError, match="cannot read"):
        cuda_build.parse_archs("hopper")
    with pytest.raises(ValueError, match="no arch"):
        cuda_build.parse_archs(" ; ")


def test_install_archs_from_env(monkeypatch):
    monkeypatch.delenv("OPENLORA_CUDA_ARCHS", raising=False)
    assert cuda_build.install_archs() == [80, 89, 90]
    monkeypatch.setenv("OPENLORA_CUDA_ARCHS", "90")
    assert cuda_build.install_archs() == [90]


def test_gencode_and_arch_support():
    assert cuda_build.gencode_flags([80, 90]) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
    sass, ptx = [80, 89, 90], [90]
    assert cuda_build.arch_supported(86, sass, ptx)      # sm_80 code runs on sm_86
    assert cuda_build.arch_supported(89, sass, ptx)
    assert cuda_build.arch_supported(100, sass, ptx)     # via PTX
    assert not cuda_build.arch_supported(80, [90], [90])
    assert not cuda_build.arch_supported(86, [89, 90], [90])


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENLORA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cuda_build.cache_root() == tmp_path / "xdg" / "openlora_kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cuda_build.cache_root() == tmp_path / "home" / ".cache" / "openlora_kernels"
    monkeypatch.setenv("OPENLORA_CACHE_DIR", str(tmp_path / "mine"))
    assert cuda_build.cache_entry("0123456789abcdef", 90) == tmp_path / "mine" / "0123456789abcdef-sm90"


def _copy_sources(tmp_path) -> Path:
    src = cuda_build.source_dir()
    assert src is not None, "csrc/ not found next to the package"
    dst = tmp_path / "csrc"
    shutil.copytree(src, dst)
    return dst


def test_source_dir_and_hash(monkeypatch, tmp_path):
    dst = _copy_sources(tmp_path)
    h = cuda_build.source_hash(dst)
    assert len(h) == 16 and h == cuda_build.source_hash(cuda_build.source_dir())
    monkeypatch.setenv("OPENLORA_CSRC_DIR", str(dst))
    assert cuda_build.source_dir() == dst
    (dst / "build.log").write_text("not a source")  # other files do not count
    assert cuda_build.source_hash(dst) == h
    with open(dst / "include" / "openlora" / "common.cuh", "a") as f:
        f.write("\n// changed\n")
    assert cuda_build.source_hash(dst) != h


def test_nvcc_commands(tmp_path):
    src = cuda_build.source_dir()
    compiles, link = cuda_build.nvcc_commands(src, tmp_path / "m.so", tmp_path, [80, 90], "abcd", nvcc="NVCC")
    assert [c[-1] for c in compiles] == [str(src / "launchers.cu"), str(src / "bindings.cpp")]
    assert "-gencode=arch=compute_90,code=compute_90" in compiles[0]
    assert '-DOLK_SASS_ARCHS="80,90"' in compiles[1] and '-DOLK_SOURCE_HASH="abcd"' in compiles[1]
    assert link[:4] == ["NVCC", "-shared", "--cudart", "static"] and link[-2].endswith("launchers.cu.o")
    assert compiles[0][compiles[0].index("-o") + 1] == str(tmp_path / "launchers.cu.o")


def test_missing_nvcc_is_a_reason(monkeypatch):
    monkeypatch.setattr(cuda_build, "find_nvcc", lambda: None)
    assert "nvcc was not found" in cuda_build.missing_tools_reason()
    monkeypatch.setenv("OPENLORA_SKIP_CUDA", "1")
    assert cuda_build.install_skip_reason() == "OPENLORA_SKIP_CUDA is set"


def test_find_nvcc_honours_cuda_home(monkeypatch, tmp_path):
    fake = tmp_path / "bin" / "nvcc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert cuda_build.find_nvcc() == str(fake)


def test_file_lock_excludes_other_processes(tmp_path):
    lock = tmp_path / "entry.lock"
    probe = textwrap.dedent(f"""
        import fcntl, os, sys
        fd = os.open({str(lock)!r}, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            sys.exit(3)
        sys.exit(0)
    """)
    with cuda_build.file_lock(lock):
        assert subprocess.run([sys.executable, "-c", probe]).returncode == 3
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0


def test_first_use_build_records_failure(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("OPENLORA_CUDA_REBUILD", raising=False)
    monkeypatch.setattr(cuda_build, "missing_tools_reason", lambda: None)
    calls = []

    def broken(src, out, archs, log):
        calls.append(archs)
        log.write("fatal error: something\n")
        raise RuntimeError("command failed (1): nvcc ...")

    mod, reason, log = cuda_build.load_or_build(90, builder=broken)
    assert mod is None and "on-first-use build for sm_90 failed: command failed (1)" in reason
    assert calls == [[90]] and "fatal error" in log.read_text()
    entry = cuda_build.cache_entry(cuda_build.source_hash(cuda_build.source_dir()), 90)
    assert (entry / cuda_build.FAILED_MARKER).exists() and not list(entry.glob("*.so"))
    mod, reason, _ = cuda_build.load_or_build(90, builder=broken)   # recorded: not retried
    assert mod is None and "an earlier on-first-use build failed" in reason and len(calls) == 1
    monkeypatch.setenv("OPENLORA_CUDA_REBUILD", "1")
    cuda_build.load_or_build(90, builder=broken)
    assert len(calls) == 2


def test_first_use_build_caches_the_module(monkeypatch, tmp_path, binding):
    monkeypatch.setenv("OPENLORA_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cuda_build, "missing_tools_reason", lambda: None)
    calls = []

    def copy_built(src, out, archs, log):  # stands in for nvcc: the binary built for this checkout
        calls.append(archs)
        shutil.copy2(binding.__file__, out)

    mod, reason, path = cuda_build.load_or_build(90, builder=copy_built)
    assert reason is None and mod.archs() == binding.archs()
    assert path.parent.name.endswith("-sm90") and path.parent.parent == tmp_path
    assert not list(path.parent.glob("*.tmp*"))
    mod2, _, _ = cuda_build.load_or_build(90, builder=copy_built)
    assert calls == [[90]] and mod2.archs() == binding.archs()


# ================================================================================ GPU tests


def _require_backend():
    reason = cuda_ext.unavailable_reason()
    if reason is None:
        return
    tools_missing = any(s in reason for s in ("nvcc was not found", "pybind11 is not installed", "sources (csrc/)"))
    if tools_missing and os.environ.get("OPENLORA_REQUIRE_CUDA_BACKEND", "0") != "1":
        pytest.skip(f"backend 'cuda' cannot be built here: {reason}")
    pytest.fail(f"backend 'cuda' is unavailable on this GPU machine: {reason}")


# Per-dtype tolerances (atol, rtol) of y against the float64 reference, set from each dtype's
# rounding (y rounded once; the tensor-core expand rounds h to the input dtype) -- not tuned.
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}
H_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-3, 1e-3)}


def _rank_table(ranks, n, S, R):
    if ranks is None:
        return torch.full((n, S), R, dtype=torch.int64)
    r = ranks.to("cpu", torch.int64).clamp(0, R)
    return r.expand(n, S) if r.dim() == 1 else r


def reference_h(x, a_list, idx, ranks):
    """float64 h [n, T, R] computed on the CPU, independent of every backend."""
    x64, idx = x.detach().cpu().double(), idx.cpu().long()
    n, (S, R, K) = len(a_list), a_list[0].shape
    rk = _rank_table(ranks, n, S, R)
    h = torch.zeros(n, x.shape[0], R, dtype=torch.float64)
    for t in range(x.shape[0]):
        s = int(idx[t])
        if 0 <= s < S:
            for i, A in enumerate(a_list):
                r = int(rk[i, s])
                h[i, t, :r] = A[s, :r].cpu().double() @ x64[t]
    return h


def reference_add(y, h, b_list, idx, scal, ranks):
    out, idx = y.detach().cpu().double().clone(), idx.cpu().long()
    n, (S, N0, R) = len(b_list), b_list[0].shape
    rk = _rank_table(ranks, n, S, R)
    for t in range(y.shape[0]):
        s = int(idx[t])
        if not 0 <= s < S:
            continue
        col = 0
        for i, B in enumerate(b_list):
            r = int(rk[i, s])
            out[t, col:col + B.shape[1]] += float(scal[s]) * (B[s, :, :r].cpu().double() @ h[i, t, :r])
            col += B.shape[1]
    return out


def _assert_close(got, want, idx, dtype, before=None, tol=None):
    atol, rtol = (tol or TOL)[dtype]
    got = got.detach().cpu().double()
    active = (idx.cpu() >= 0)
    err = (got - want).abs() - rtol * want.abs()
    if active.any():
        worst = float(err[active].max())
        assert worst <= atol, f"{dtype}: max excess error {worst:.3g} over atol {atol} (rows with an adapter)"
    if before is not None and (~active).any():
        assert torch.equal(got[~active], before.cpu().double()[~active]), "rows with slot -1 changed"


def _weights(S, R, K, widths, dtype, dev, ranks=None, poison=True):
    """A ~ N(0, 1/K), B ~ N(0, 1/R) (so h and the delta are O(1)); entries past each slot's rank
    are NaN when ranks are given, so reading them would show."""
    n = len(widths)
    a = [torch.randn(S, R, K, device=dev) / K ** 0.5 for _ in range(n)]
    b = [torch.randn(S, w, R, device=dev) / max(R, 1) ** 0.5 for w in widths]
    if ranks is not None and poison:
        rk = _rank_table(ranks, n, S, R).to(dev)
        for i in range(n):
            past = torch.arange(R, device=dev)[None, :] >= rk[i][:, None]  # [S, R]
            a[i][past[:, :, None].expand_as(a[i])] = float("nan")
            b[i][past[:, None, :].expand_as(b[i])] = float("nan")
    return [A.to(dtype) for A in a], [B.to(dtype) for B in b]


CASES = {
    # name: (T, K, widths, S, R, index kind, ranks kind)
    "one_row": (1, 100, (72,), 3, 16, "distinct", None),
    "odd": (37, 100, (72,), 5, 16, "mixed", None),
    "all_none": (9, 64, (40,), 3, 8, "none", None),
    "one_adapter": (33, 96, (50,), 4, 16, "one", None),
    "distinct": (16, 136, (64,), 16, 8, "distinct", None),
    "hetero_ranks": (29, 100, (72,), 4, 16, "mixed", "per_slot"),
    "qkv_unequal": (21, 128, (96, 32, 32), 3, 16, "mixed", "per_slice"),
    "nine_slices": (11, 64, (8, 1, 24, 3, 16, 16, 5, 9, 40), 3, 8, "mixed", None),
    "rank_4": (13, 64, (40,), 3, 4, "mixed", None),
    "rank_80": (13, 256, (300,), 3, 80, "mixed", "per_slot"),
}


def _indices(kind, T, S, dev):
    if kind == "none":
        return torch.full((T,), -1, device=dev)
    if kind == "one":
        return torch.full((T,), S - 1, device=dev)
    if kind == "distinct":
        return torch.randperm(max(T, S), device=dev)[:T] % S
    idx = torch.randint(-1, S, (T,), device=dev)
    idx[0] = S - 1  # at least one row with an adapter
    return idx


def _ranks(kind, n, S, R, dev):
    if kind == "per_slot":
        r = torch.randint(0, R + 1, (S,), device=dev, dtype=torch.int32)
        r[0], r[-1] = 0, R
        return r
    if kind == "per_slice":
        return torch.randint(0, R + 1, (n, S), device=dev, dtype=torch.int64)
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("x_layout", ["contiguous", "strided_aligned", "strided_unaligned"])
@pytest.mark.parametrize("block_m", [1, 2, 4, 16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_parity(case, dtype, block_m, x_layout):
    _require_backend()
    torch.manual_seed(hash((case, str(dtype), block_m, x_layout)) % 2**31)
    dev = torch.device("cuda")
    T, K, widths, S, R, ikind, rkind = CASES[case]
    idx = _indices(ikind, T, S, dev)
    ranks = _ranks(rkind, len(widths), S, R, dev)
    a, b = _weights(S, R, K, widths, dtype, dev, ranks)
    if x_layout == "contiguous":
        x = torch.randn(T, K, device=dev).to(dtype)
    elif x_layout == "strided_aligned":  # every other row of a wider buffer: 16-byte loads stay legal
        x = torch.randn(2 * T, K + 16, device=dev).to(dtype)[::2, 8:8 + K]
    else:  # rows start one element in: the scalar path
        x = torch.randn(T, K + 3, device=dev).to(dtype)[:, 1:1 + K]
    scal = torch.rand(S, device=dev) + 0.5
    y0 = torch.randn(T, sum(widths), device=dev).to(dtype)
    meta = olk.build_batch_meta(idx, S, block_m=block_m)
    listed = len(widths) > 1
    A = a if listed else a[0]
    Bm = b if listed else b[0]

    h_ref = reference_h(x, a, idx, ranks)
    want = reference_add(y0, h_ref, b, idx, scal.cpu(), ranks)

    y = y0.clone()
    out = olk.add_lora(y, x, A, Bm, meta, scal, ranks, backend="cuda")
    torch.cuda.synchronize()
    assert out is y
    _assert_close(y, want, idx, dtype, before=y0)

    h = olk.lora_shrink(x, A, meta, ranks, backend="cuda")
    torch.cuda.synchronize()
    assert h.shape == (len(widths), T, R) and h.dtype == torch.float32
    _assert_close(h.reshape(len(widths) * T, R), h_ref.reshape(-1, R), idx.repeat(len(widths)), dtype, tol=H_TOL)
    if ranks is not None:  # past each slot's rank h is exactly 0 (the weights there are NaN)
        rk = _rank_table(ranks, len(widths), S, R)
        for i in range(len(widths)):
            for t in range(T):
                s = int(idx[t])
                if s >= 0:
                    assert torch.equal(h[i, t, int(rk[i, s]):].cpu(), torch.zeros(R - int(rk[i, s])))
    assert torch.equal(h[:, idx < 0].cpu(), torch.zeros_like(h[:, idx < 0].cpu()))

    y = y0.clone()
    olk.lora_expand(y, h_ref.to(dev, torch.float32), Bm, meta, scal, ranks, backend="cuda")
    torch.cuda.synchronize()
    _assert_close(y, want, idx, dtype, before=y0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_empty_batch(dtype):
    _require_backend()
    dev = torch.device("cuda")
    a, b = _weights(3, 8, 32, (16,), dtype, dev)
    x, y = torch.randn(0, 32, device=dev, dtype=dtype), torch.randn(0, 16, device=dev, dtype=dtype)
    olk.add_lora(y, x, a[0], b[0], torch.zeros(0, dtype=torch.long, device=dev), torch.ones(3, device=dev), backend="cuda")
    assert olk.lora_shrink(x, a[0], torch.zeros(0, dtype=torch.long, device=dev), backend="cuda").shape == (1, 0, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [8, 96])  # decode (fused) and prefill (tensor-core shrink + expand)
def test_cuda_graph_replay_with_new_indices(T):
    _require_backend()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    S, R, K, widths = 4, 16, 128, (64, 32)
    ranks = torch.tensor([16, 8, 0, 4], device=dev, dtype=torch.int32)
    a, b = _weights(S, R, K, widths, dtype, dev, ranks)
    x = torch.randn(T, K, device=dev).to(dtype)
    y0 = torch.randn(T, sum(widths), device=dev).to(dtype)
    y = y0.clone()
    scal = torch.rand(S, device=dev) + 0.5
    idx = torch.full((T,), -1, device=dev, dtype=torch.long)

    def step():
        y.copy_(y0)
        olk.add_lora(y, x, a, b, idx, scal, ranks, backend="cuda")  # metadata built inside the graph

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside capture (loads the module)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(3):
        new = torch.randint(-1, S, (T,), device=dev)
        idx.copy_(new)
        y.fill_(float("nan"))  # poison: the replay must rewrite every row
        graph.replay()
        torch.cuda.synchronize()
        want = reference_add(y0, reference_h(x, a, new, ranks), b, new, scal.cpu(), ranks)
        _assert_close(y, want, new, dtype, before=y0)


@pytest.mark.gpu
def test_runs_on_the_current_stream():
    _require_backend()
    dev, dtype = torch.device("cuda"), torch.float16
    S, R, K, N, T = 3, 16, 256, 128, 24
    a, b = _weights(S, R, K, (N,), dtype, dev)
    x = torch.randn(T, K, device=dev).to(dtype)
    idx = torch.randint(0, S, (T,), device=dev)
    scal = torch.ones(S, device=dev)
    y0 = torch.randn(T, N, device=dev).to(dtype)
    y = y0.clone()
    meta = olk.build_batch_meta(idx, S, block_m=1)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(200_000_000)  # keeps stream s busy for a while
        olk.add_lora(y, x, a[0], b[0], meta, scal, backend="cuda")
    early = y.clone()  # on the default stream: does not wait for s
    still_busy = not s.query()
    torch.cuda.synchronize()
    if not still_busy:
        pytest.skip("the sleep on stream s ended before the check; inconclusive")
    assert torch.equal(early, y0), "the kernel ran before the work queued ahead of it on its stream"
    want = reference_add(y0, reference_h(x, a, idx, None), b, idx, scal.cpu(), None)
    _assert_close(y, want, idx, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("block_m", [1, 64])
def test_offsets_past_int32(block_m):
    """x and y with more than 2^31 elements; the rows with adapters sit past that boundary."""
    _require_backend()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    S, R, K, N = 2, 16, 4096, 4096
    T = (1 << 31) // K + 64
    need = 2 * T * (K + N) * 2
    free, _ = torch.cuda.mem_get_info()
    if free < need + (1 << 30):
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    x = torch.empty(T, K, device=dev, dtype=dtype)
    x[-96:].normal_()
    x[:-96].zero_()
    y = torch.zeros(T, N, device=dev, dtype=dtype)
    idx = torch.full((T,), -1, device=dev, dtype=torch.long)
    idx[-64:] = torch.randint(0, S, (64,), device=dev)
    a, b = _weights(S, R, K, (N,), dtype, dev)
    scal = torch.ones(S, device=dev)
    meta = olk.build_batch_meta(idx, S, block_m=block_m)
    olk.add_lora(y, x, a[0], b[0], meta, scal, backend="cuda")
    h = olk.lora_shrink(x, a[0], meta, backend="cuda")
    torch.cuda.synchronize()
    tail = slice(T - 64, T)
    h_ref = reference_h(x[tail], a, idx[tail], None)
    want = reference_add(torch.zeros(64, N), h_ref, b, idx[tail], scal.cpu(), None)
    _assert_close(y[tail], want, idx[tail], dtype)
    _assert_close(h[0, tail], h_ref[0], idx[tail], dtype, tol=H_TOL)
    assert int(torch.count_nonzero(y[:T - 64])) == 0, "rows without an adapter were written"


# ------------------------------------------------------------------- tensor-core fragment addressing


def _frag_fns():
    """The lane -> (row, column) functions of csrc/include/openlora/mma.cuh, read from the source
    (each is one C expression of `lane` that is also a Python expression)."""
    import re
    src = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "csrc", "include", "openlora", "mma.cuh")).read()
    fns = {}
    for name, expr in re.findall(r"OLK_DEVICE int (\w+)\(int lane\) \{ return ([^;]+); \}", src):
        fns[name] = eval("lambda lane: " + expr)      # noqa: S307 (our own header's integer expressions)
    return fns


def _ldmatrix_x4(tile, addr, trans):
    """PTX ldmatrix.m8n8.x4(.trans) on a 2-D shared tile: lanes 8i..8i+7 give the (row, col) of
    matrix i's rows (8 contiguous elements each); register i of lane t holds matrix i's elements
    (t/4, 2(t%4)), (t/4, 2(t%4)+1), or with .trans (2(t%4), t/4), (2(t%4)+1, t/4)."""
    regs = [[None] * 4 for _ in range(32)]
    for t in range(32):
        g, q = t // 4, t % 4
        for i in range(4):
            rows = [addr(8 * i + r) for r in range(8)]
            if trans:
                pair = [tile[rows[2 * q + e][0]][rows[2 * q + e][1] + g] for e in (0, 1)]
            else:
                pair = [tile[rows[g][0]][rows[g][1] + 2 * q + e] for e in (0, 1)]
            regs[t][i] = tuple(pair)
    return regs


def test_expand_b_fragments_are_the_same_from_either_b_layout():
    """The tensor-core expand's B fragments for two adjacent n8 tiles and one k16 step, read by
    ldmatrix from B kept as [n][k] (rank-contiguous B) and by ldmatrix .trans from B kept as [k][n]
    (the pool's column-contiguous B, vec_n), with the header's own lane functions: both must give
    every lane the elements mma.m16n8k16 wants, b0 = (k 2q, 2q+1; n g), b1 = (k 2q+8, +9; n g), for
    tiles n 0-7 and 8-15 (registers 0, 1 and 2, 3)."""
    f = _frag_fns()
    B = [[(n, k) for k in range(16)] for n in range(16)]          # B[n][k] = its own coordinates
    Bt = [[B[n][k] for n in range(16)] for k in range(16)]         # the same values as [k][n]
    plain = _ldmatrix_x4(B, lambda lane: (f["b_frag_row"](lane), f["b_frag_col"](lane)), trans=False)
    trans = _ldmatrix_x4(Bt, lambda lane: (f["bt_frag_k"](lane), f["bt_frag_n"](lane)), trans=True)
    for t in range(32):
        g, q = t // 4, t % 4
        want = [((n0 + g, 2 * q + k0), (n0 + g, 2 * q + 1 + k0)) for n0 in (0, 8) for k0 in (0, 8)]
        assert plain[t] == want, (t, plain[t])
        assert trans[t] == want, (t, trans[t])
