// Python binding of the SGMV launchers (module openlora_kernels.ops._cuda_sgmv).
//
// Takes raw device pointers (Python ints from tensor.data_ptr()), sizes, strides in elements,
// dtype codes and the CUDA stream handle (torch.cuda.current_stream().cuda_stream): no libtorch
// and no torch headers, so one binary serves every torch version. openlora_kernels/ops/cuda_ext.py
// packs the arguments; the layout of `args` and of each slice tuple is documented there and in
// parse_params below.
//
// Errors: bad arguments raise ValueError naming the argument; CUDA failures raise CudaError
// (a RuntimeError) carrying the CUDA error name and string.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "openlora/launchers.h"

namespace py = pybind11;
using openlora::DType;
using openlora::Op;
using openlora::SgmvParams;

#ifndef OLK_SASS_ARCHS
#define OLK_SASS_ARCHS ""
#endif
#ifndef OLK_PTX_ARCHS
#define OLK_PTX_ARCHS ""
#endif
#ifndef OLK_SOURCE_HASH
#define OLK_SOURCE_HASH "unknown"
#endif

namespace {

int64_t get(const py::dict& d, const char* key) {
  if (!d.contains(key)) throw std::invalid_argument(std::string("args: missing key '") + key + "'");
  return d[key].cast<int64_t>();
}

template <typename P>
P ptr(const py::dict& d, const char* key) {
  return reinterpret_cast<P>(static_cast<std::uintptr_t>(get(d, key)));
}

std::vector<int> parse_archs(const std::string& s) {
  std::vector<int> out;
  std::string cur;
  for (char c : s + ",") {
    if (c >= '0' && c <= '9') {
      cur += c;
    } else if (!cur.empty()) {
      out.push_back(std::stoi(cur));
      cur.clear();
    }
  }
  return out;
}

// args: x, sx_t, sx_k, y, sy_t, sy_n, h, sh_n, sh_t, sh_r, scal, s_scal, ranks, sr_n, sr_s,
//       ranks_i64, has_ranks, sorted_tokens, tile_info, G, T, K, R, S, slice_base
// slices: up to 8 tuples (a, a_ss, a_sr, a_sk, b, b_ss, b_sn, b_sr, n, col)
SgmvParams parse_params(const py::dict& args, const std::vector<std::vector<int64_t>>& slices) {
  SgmvParams p;
  std::memset(&p, 0, sizeof p);   // padding too: the stub compares parameter bytes
  p.x = ptr<const void*>(args, "x");
  p.sx_t = get(args, "sx_t");
  p.sx_k = get(args, "sx_k");
  p.y = ptr<void*>(args, "y");
  p.sy_t = get(args, "sy_t");
  p.sy_n = get(args, "sy_n");
  p.h = ptr<float*>(args, "h");
  p.sh_n = get(args, "sh_n");
  p.sh_t = get(args, "sh_t");
  p.sh_r = get(args, "sh_r");
  p.scal = ptr<const float*>(args, "scal");
  p.s_scal = get(args, "s_scal");
  p.ranks = ptr<const void*>(args, "ranks");
  p.sr_n = get(args, "sr_n");
  p.sr_s = get(args, "sr_s");
  p.ranks_i64 = static_cast<int>(get(args, "ranks_i64"));
  p.has_ranks = static_cast<int>(get(args, "has_ranks"));
  if (args.contains("offs")) {   // the packed form (optional keys)
    p.offs = ptr<const void*>(args, "offs");
    p.offs_i64 = static_cast<int>(get(args, "offs_i64"));
    p.rows = get(args, "rows");
    p.has_offs = p.offs != nullptr;
    if (p.has_offs && p.rows < 0) throw std::invalid_argument("rows: must be >= 0");
  }
  p.sorted_tokens = ptr<const int32_t*>(args, "sorted_tokens");
  p.tile_info = ptr<const int32_t*>(args, "tile_info");
  p.G = get(args, "G");
  p.T = get(args, "T");
  p.K = get(args, "K");
  p.R = get(args, "R");
  p.S = get(args, "S");
  p.slice_base = static_cast<int>(get(args, "slice_base"));
  if (slices.empty() || slices.size() > static_cast<size_t>(openlora::kMaxSlices)) {
    throw std::invalid_argument("slices: expected 1 to " + std::to_string(openlora::kMaxSlices) +
                                " slices per launch, got " + std::to_string(slices.size()));
  }
  p.n_slices = static_cast<int>(slices.size());
  for (size_t i = 0; i < slices.size(); ++i) {
    const auto& s = slices[i];
    if (s.size() != 10) {
      throw std::invalid_argument("slices[" + std::to_string(i) + "]: expected 10 integers "
                                  "(a, a_ss, a_sr, a_sk, b, b_ss, b_sn, b_sr, n, col), got " + std::to_string(s.size()));
    }
    openlora::SliceArgs& d = p.slices[i];
    d.a = reinterpret_cast<const void*>(static_cast<std::uintptr_t>(s[0]));
    d.a_ss = s[1];
    d.a_sr = s[2];
    d.a_sk = s[3];
    d.b = reinterpret_cast<const void*>(static_cast<std::uintptr_t>(s[4]));
    d.b_ss = s[5];
    d.b_sn = s[6];
    d.b_sr = s[7];
    d.n = s[8];
    d.col = s[9];
  }
  return p;
}

py::dict plan_to_dict(const openlora::LaunchPlan& pl) {
  py::dict d;
  d["kernel"] = pl.kernel;
  d["bm"] = pl.bm;
  d["grid"] = py::make_tuple(pl.grid[0], pl.grid[1], pl.grid[2]);
  d["threads"] = pl.threads;
  d["smem_bytes"] = pl.smem_bytes;
  d["vec_k"] = static_cast<bool>(pl.vec_k);
  d["vec_r"] = static_cast<bool>(pl.vec_r);
  d["vec_n"] = static_cast<bool>(pl.vec_n);
  d["vec_y"] = static_cast<bool>(pl.vec_y);
  d["split_k"] = pl.split_k;
  d["k_per_split"] = pl.k_per_split;
  d["cols_per_chunk"] = pl.cols_per_chunk;
  return d;
}

// ----------------------------------------------------------------------------- bound plans
// One patched layer's static arguments (weights, strides, slices, scalings, ranks), parsed and
// validated once when the layer is bound; a call passes x, y (pointer and strides), the batch
// metadata (a MetaArgs made once per forward) and the stream. Every call still goes through
// run_sgmv (plan, validation of the call's sizes, kernel choice), as Bound.run does.

struct MetaArgs {             // the batch metadata of one forward, as the kernels read it
  const int32_t* sorted_tokens;
  const int32_t* tile_info;
  int64_t G, T;
  int block_m;
};

class Bound {
 public:
  // slices: all slices of the layer (10-int tuples as for run); launched in groups of kMaxSlices
  Bound(int dtype, int64_t K, int64_t R, int64_t S, std::uintptr_t scal, int64_t s_scal, std::uintptr_t ranks,
        int64_t sr_n, int64_t sr_s, int ranks_i64, int has_ranks, const std::vector<std::vector<int64_t>>& slices)
      : dtype_(static_cast<DType>(dtype)) {
    if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype: expected 0, 1 or 2, got " + std::to_string(dtype));
    if (slices.empty()) throw std::invalid_argument("slices: expected at least one slice");
    const size_t n = slices.size();
    for (size_t base = 0; base < n; base += openlora::kMaxSlices) {
      const size_t cnt = std::min<size_t>(openlora::kMaxSlices, n - base);
      py::dict args;   // the same parsing (and checks) as run's
      for (const char* k : {"x", "sx_t", "sx_k", "y", "sy_t", "sy_n", "h", "sh_n", "sh_t", "sh_r",
                            "sorted_tokens", "tile_info", "G", "T"}) {
        args[k] = 0;
      }
      args["scal"] = scal;
      args["s_scal"] = s_scal;
      args["ranks"] = ranks;
      args["sr_n"] = sr_n;
      args["sr_s"] = sr_s;
      args["ranks_i64"] = ranks_i64;
      args["has_ranks"] = has_ranks;
      args["K"] = K;
      args["R"] = R;
      args["S"] = S;
      args["slice_base"] = static_cast<int64_t>(base);
      std::vector<std::vector<int64_t>> group(slices.begin() + base, slices.begin() + base + cnt);
      groups_.push_back(parse_params(args, group));
    }
  }

  // y += delta: block_m < 16 one fused launch per group; else shrink into h (zero-filled fp32
  // [n, T, R], given) then expand, as cuda_ext.add_lora does.
  void add(std::uintptr_t x, int64_t sx_t, int64_t sx_k, std::uintptr_t y, int64_t sy_t, int64_t sy_n,
           const MetaArgs& m, std::uintptr_t h, int64_t sh_n, int64_t sh_t, int64_t sh_r, std::uintptr_t stream) {
    const bool split = m.block_m >= 16;
    if (split && h == 0) throw std::invalid_argument("h: block_m >= 16 runs shrink then expand through h");
    for (const SgmvParams& g : groups_) {
      SgmvParams p;
      std::memcpy(&p, &g, sizeof p);
      p.x = reinterpret_cast<const void*>(x);
      p.sx_t = sx_t;
      p.sx_k = sx_k;
      p.y = reinterpret_cast<void*>(y);
      p.sy_t = sy_t;
      p.sy_n = sy_n;
      p.sorted_tokens = m.sorted_tokens;
      p.tile_info = m.tile_info;
      p.G = m.G;
      p.T = m.T;
      if (!split) {
        openlora::run_sgmv(Op::kFused, dtype_, m.block_m, p, stream);
        continue;
      }
      p.h = reinterpret_cast<float*>(h);
      p.sh_n = sh_n;
      p.sh_t = sh_t;
      p.sh_r = sh_r;
      openlora::run_sgmv(Op::kShrink, dtype_, m.block_m, p, stream);
      openlora::run_sgmv(Op::kExpand, dtype_, m.block_m, p, stream);
    }
  }

  int groups() const { return static_cast<int>(groups_.size()); }

 private:
  DType dtype_;
  std::vector<SgmvParams> groups_;
};

}  // namespace

PYBIND11_MODULE(_cuda_sgmv, m) {
  m.doc() = "openlora_kernels CUDA SGMV kernels (raw-pointer binding; see openlora_kernels/ops/cuda_ext.py)";
  py::register_exception<openlora::CudaError>(m, "CudaError", PyExc_RuntimeError);

  m.attr("OP_FUSED") = static_cast<int>(Op::kFused);
  m.attr("OP_SHRINK") = static_cast<int>(Op::kShrink);
  m.attr("OP_EXPAND") = static_cast<int>(Op::kExpand);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(DType::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(DType::kBFloat16);
  m.attr("DTYPE_FLOAT32") = static_cast<int>(DType::kFloat32);
  m.attr("MAX_SLICES") = openlora::kMaxSlices;
  m.attr("MAX_SIMT_RANK") = openlora::kMaxSimtRank;
  m.attr("SOURCE_HASH") = OLK_SOURCE_HASH;

  m.def("archs", [] { return parse_archs(OLK_SASS_ARCHS); },
        "Compute capabilities with machine code (SASS) in this binary, e.g. [80, 89, 90].");
  m.def("build_info", [] {
        py::dict d;
        d["sass_archs"] = parse_archs(OLK_SASS_ARCHS);
        d["ptx_archs"] = parse_archs(OLK_PTX_ARCHS);
        d["nvcc_arch_list"] = openlora::compiled_arch_list();
        d["nvcc_version"] = openlora::nvcc_version();
        d["source_hash"] = std::string(OLK_SOURCE_HASH);
        return d;
      }, "Archs (SASS, PTX), nvcc version and the csrc/ source hash this binary was built from.");
  m.def("plan",
        [](int op, int dtype, int block_m, const py::dict& args, const std::vector<std::vector<int64_t>>& slices,
           int sm_count) {
          const SgmvParams p = parse_params(args, slices);
          return plan_to_dict(openlora::plan_launch(static_cast<Op>(op), static_cast<DType>(dtype), block_m, p, sm_count));
        },
        py::arg("op"), py::arg("dtype"), py::arg("block_m"), py::arg("args"), py::arg("slices"), py::arg("sm_count"),
        "The launch run() would make on a GPU with sm_count SMs (pure: touches no GPU).");
  m.def("run",
        [](int op, int dtype, int block_m, const py::dict& args, const std::vector<std::vector<int64_t>>& slices,
           std::uintptr_t stream) {
          const SgmvParams p = parse_params(args, slices);
          openlora::run_sgmv(static_cast<Op>(op), static_cast<DType>(dtype), block_m, p, stream);
        },
        py::arg("op"), py::arg("dtype"), py::arg("block_m"), py::arg("args"), py::arg("slices"), py::arg("stream"),
        "Launch one SGMV kernel on `stream` (asynchronous; no host synchronisation).");
  m.def("sm_count", &openlora::current_device_sm_count, "Multiprocessor count of the current CUDA device.");

  py::class_<MetaArgs>(m, "MetaArgs", "A forward's batch metadata as the kernels read it (made once per forward).")
      .def(py::init([](std::uintptr_t sorted_tokens, std::uintptr_t tile_info, int64_t G, int64_t T, int block_m) {
             return MetaArgs{reinterpret_cast<const int32_t*>(sorted_tokens), reinterpret_cast<const int32_t*>(tile_info),
                             G, T, block_m};
           }),
           py::arg("sorted_tokens"), py::arg("tile_info"), py::arg("G"), py::arg("T"), py::arg("block_m"))
      .def_readonly("G", &MetaArgs::G)
      .def_readonly("T", &MetaArgs::T)
      .def_readonly("block_m", &MetaArgs::block_m);
  py::class_<Bound>(m, "Bound", "One layer's static add_lora arguments, parsed once (see cuda_ext.BoundAdd).")
      .def(py::init<int, int64_t, int64_t, int64_t, std::uintptr_t, int64_t, std::uintptr_t, int64_t, int64_t, int, int,
                    const std::vector<std::vector<int64_t>>&>(),
           py::arg("dtype"), py::arg("K"), py::arg("R"), py::arg("S"), py::arg("scal"), py::arg("s_scal"),
           py::arg("ranks"), py::arg("sr_n"), py::arg("sr_s"), py::arg("ranks_i64"), py::arg("has_ranks"),
           py::arg("slices"))
      .def("add", &Bound::add, "y += delta on `stream` (asynchronous; no host synchronisation).")
      .def_property_readonly("groups", &Bound::groups);
  m.def("set_launch_stub", &openlora::set_launch_stub, py::arg("on"), py::arg("sm_count") = 132,
        "Host-side tests without a GPU: while on, launches make no CUDA call; they are counted and the last "
        "few recorded (stub_launches). Resets the count.");
  m.def("stub_launch_count", &openlora::stub_launch_count);
  m.def("stub_launches", [] {
    py::list out;
    for (const auto& r : openlora::stub_recent_launches()) {
      py::dict d;
      d["kernel"] = r.kernel;
      d["grid"] = py::make_tuple(r.grid[0], r.grid[1], r.grid[2]);
      d["threads"] = r.threads;
      d["smem_bytes"] = r.smem_bytes;
      d["stream"] = r.stream;
      d["params"] = py::bytes(r.params);
      out.append(d);
    }
    return out;
  }, "The last launches made under the stub: kernel, grid, threads, smem_bytes, stream, params (bytes).");
}
