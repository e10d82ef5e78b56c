// pybind11 binding of the native CPU kernels (module openlora_kernels.ops._cpu_sgmv).
//
// Like the CUDA binding it takes raw data pointers (tensor.data_ptr()), sizes and strides in
// elements, and dtype codes: no torch headers, no libtorch, one binary for every torch version.
// The Python side (openlora_kernels/ops/cpu_ext.py) validates everything before calling `run`.
// The kernel loop is compiled for several instruction sets (target_clones) and the best one for
// the machine is picked when the module loads, so a build is portable across x86-64 CPUs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <stdexcept>
#if defined(__linux__)
#include <dlfcn.h>
#endif
#include <string>

#include "sgmv_cpu.h"

namespace py = pybind11;
using namespace openlora::cpu;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define OLK_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define OLK_CLONES
#endif

OLK_CLONES static void claim_f32(const Args& p, const Unit* u, int64_t n, std::atomic<int64_t>& next, int64_t st) {
  run_claimed<float>(p, u, n, next, st);
}
OLK_CLONES static void claim_f16(const Args& p, const Unit* u, int64_t n, std::atomic<int64_t>& next, int64_t st) {
  run_claimed<f16>(p, u, n, next, st);
}
OLK_CLONES static void claim_bf16(const Args& p, const Unit* u, int64_t n, std::atomic<int64_t>& next, int64_t st) {
  run_claimed<bf16>(p, u, n, next, st);
}
using ClaimFn = void (*)(const Args&, const Unit*, int64_t, std::atomic<int64_t>&, int64_t);

// Threads: the OpenMP runtime PyTorch already loaded (its intra-op team, sized by
// torch.set_num_threads), found by symbol at load time; this module links no OpenMP runtime of
// its own, so there is never a second thread pool competing for the cores. Right after the base
// layer's GEMM that team is still spinning, so a parallel region starts without waking threads.
// Without a GNU OpenMP runtime in the process every call runs on the calling thread.
struct OmpRuntime {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;   // GOMP_parallel
  int (*max_threads)() = nullptr;
  OmpRuntime() {
#if defined(__linux__)
    parallel = reinterpret_cast<decltype(parallel)>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
    max_threads = reinterpret_cast<decltype(max_threads)>(dlsym(RTLD_DEFAULT, "omp_get_max_threads"));
    if (!max_threads) parallel = nullptr;
#endif
  }
};
static OmpRuntime& omp() { static OmpRuntime rt; return rt; }
static int64_t g_min_parallel_cost = 48 * 1024;   // weight elements below which one thread runs a call
static int g_max_threads = 0;                      // 0: PyTorch's current intra-op thread count

struct Split {
  const Args* p; const Unit* units; int64_t n; int64_t threads; ClaimFn fn; std::atomic<int64_t> next{0};
};
static void split_worker(void* data) {
  Split& s = *static_cast<Split*>(data);
  s.fn(*s.p, s.units, s.n, s.next, s.threads);
}

static void run_split(const Args& p, ClaimFn claimed) {
  static thread_local std::vector<Unit> units;      // reused: no allocation per call
  make_units(p, units);
  const int64_t n = static_cast<int64_t>(units.size());
  int threads = 1;
  if (omp().parallel != nullptr && n > 1) {
    int64_t total = 0;
    for (const Unit& u : units) total += unit_cost(p, u);
    if (total >= g_min_parallel_cost) {
      threads = g_max_threads > 0 ? g_max_threads : omp().max_threads();
      threads = static_cast<int>(std::min<int64_t>({static_cast<int64_t>(threads), n, 64}));
    }
  }
  Split s{&p, units.data(), n, threads, claimed};
  if (threads <= 1) {
    split_worker(&s);
  } else {
    omp().parallel(split_worker, &s, static_cast<unsigned>(threads), 0);
  }
}

static const void* ptr(int64_t v) { return reinterpret_cast<const void*>(static_cast<uintptr_t>(v)); }

static void dispatch(int dtype, const Args& p) {
  py::gil_scoped_release nogil;
  switch (dtype) {
    case kF32: run_split(p, claim_f32); break;
    case kF16: run_split(p, claim_f16); break;
    case kBF16: run_split(p, claim_bf16); break;
    default: break;  // validated when the plan was made
  }
}

// The arguments that do not change from call to call for one layer (its weights, scalings and
// ranks), validated and converted once. A call then passes only the batch: rows, x, y, h and the
// metadata (converting ~30 Python arguments on every call would cost more than the kernel).
class Plan {
 public:
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  Plan(int op, int dtype, int64_t K, int64_t R, int64_t S,
       const std::vector<int64_t>& a, int64_t a_ss, int64_t a_sr, int64_t a_sk,
       const std::vector<int64_t>& b, const std::vector<int64_t>& widths, const std::vector<int64_t>& b_ss,
       int64_t b_sn, int64_t b_sr, int64_t scal, int64_t ranks, bool ranks64, int64_t s_rn, int64_t s_rs)
      : dtype_(dtype) {
    if (op < kAdd || op > kExpand) throw std::invalid_argument("op: unknown op code " + std::to_string(op));
    if (dtype < kF16 || dtype > kF32) throw std::invalid_argument("dtype: unknown dtype code " + std::to_string(dtype));
    if (K < 0 || R < 0 || S < 0) throw std::invalid_argument("K, R, S: sizes must be >= 0");
    if (op != kExpand && a.empty()) throw std::invalid_argument("a: no lora_a slices given");
    if (op != kShrink && (b.empty() || widths.size() != b.size() || b_ss.size() != b.size()))
      throw std::invalid_argument("b: lora_b slices, widths and slot strides must have the same length");
    if (op == kAdd && a.size() != b.size()) throw std::invalid_argument("a, b: different numbers of slices");
    if (op != kShrink && scal == 0 && S > 0) throw std::invalid_argument("scalings: null pointer");
    p_.op = op; p_.K = K; p_.R = R; p_.S = S;
    for (int64_t v : a) a_.push_back(ptr(v));
    for (int64_t v : b) b_.push_back(ptr(v));
    widths_ = widths; b_ss_ = b_ss;
    p_.a = a_.data(); p_.n_a = static_cast<int64_t>(a_.size()); p_.a_ss = a_ss; p_.a_sr = a_sr; p_.a_sk = a_sk;
    p_.b = b_.data(); p_.widths = widths_.data(); p_.b_ss = b_ss_.data(); p_.n_b = static_cast<int64_t>(b_.size());
    p_.b_sn = b_sn; p_.b_sr = b_sr;
    for (int64_t w : widths_) n_total_ += w;
    p_.scal = static_cast<const float*>(ptr(scal));
    p_.ranks = ranks ? ptr(ranks) : nullptr; p_.ranks64 = ranks64; p_.s_rn = s_rn; p_.s_rs = s_rs;
  }

  // add (fused): y[T, N] += ...; x [T, K]
  void add(int64_t T, int64_t x, int64_t sx_t, int64_t sx_k, int64_t y, int64_t sy_t, int64_t sy_n,
           int64_t sorted, int64_t seg) {
    if (p_.op != kAdd) throw std::invalid_argument("plan: not an add plan");
    Args p = batch(T, sorted, seg);
    p.x = ptr(x); p.sx_t = sx_t; p.sx_k = sx_k;
    p.y = const_cast<void*>(ptr(y)); p.sy_t = sy_t; p.sy_n = sy_n;
    dispatch(dtype_, p);
  }

  // add for contiguous x [T, K] and y [T, sum of widths] (what a patched linear layer passes):
  // the same as add() with the row strides implied, five arguments to convert instead of nine.
  void add_rows(int64_t T, int64_t x, int64_t y, int64_t sorted, int64_t seg) {
    add(T, x, p_.K, 1, y, n_total_, 1, sorted, seg);
  }

  // shrink: h[n, T, R] fp32 (zero-filled by the caller) from x; expand: y from h (any float dtype)
  void run(int64_t T, int64_t x, int64_t sx_t, int64_t sx_k, int64_t y, int64_t sy_t, int64_t sy_n,
           int64_t h, int h_dtype, int64_t sh_n, int64_t sh_t, int64_t sh_r, int64_t sorted, int64_t seg) {
    // (an empty h, T == 0 or R == 0, may have a null data pointer: nothing is read or written then)
    if (p_.op != kAdd && h == 0 && T > 0 && p_.R > 0)
      throw std::invalid_argument("h: the intermediate is required for shrink / expand");
    if (h_dtype < kF16 || h_dtype > kF32) throw std::invalid_argument("h_dtype: unknown dtype code");
    Args p = batch(T, sorted, seg);
    p.x = ptr(x); p.sx_t = sx_t; p.sx_k = sx_k;
    p.y = const_cast<void*>(ptr(y)); p.sy_t = sy_t; p.sy_n = sy_n;
    p.h = const_cast<void*>(ptr(h)); p.h_dtype = h_dtype; p.sh_n = sh_n; p.sh_t = sh_t; p.sh_r = sh_r;
    dispatch(dtype_, p);
  }

 private:
  Args batch(int64_t T, int64_t sorted, int64_t seg) const {
    if (T < 0) throw std::invalid_argument("T: must be >= 0");
    // Empty metadata tensors (T == 0 rows, S == 0 slots) may have null data pointers: no unit
    // is made then (make_units), so nothing is read through them.
    if ((sorted == 0 && T > 0) || (seg == 0 && p_.S > 0)) throw std::invalid_argument("metadata: null pointer");
    Args p = p_;
    p.T = T;
    p.sorted = static_cast<const int32_t*>(ptr(sorted));
    p.seg = static_cast<const int32_t*>(ptr(seg));
    return p;
  }
  Args p_;                                   // its per-slice arrays point into the vectors below
  std::vector<const void*> a_, b_;
  std::vector<int64_t> widths_, b_ss_;
  int64_t n_total_ = 0;
  int dtype_;
};

PYBIND11_MODULE(_cpu_sgmv, m) {
  m.doc() = "openlora_kernels native CPU multi-LoRA kernels (raw pointers; see ops/cpu_ext.py)";
  py::class_<Plan>(m, "Plan", "one layer's static arguments; add() / run() per batch")
      .def(py::init<int, int, int64_t, int64_t, int64_t, const std::vector<int64_t>&, int64_t, int64_t, int64_t,
                    const std::vector<int64_t>&, const std::vector<int64_t>&, const std::vector<int64_t>&, int64_t,
                    int64_t, int64_t, int64_t, bool, int64_t, int64_t>())
      .def("add", &Plan::add, "fused shrink + expand: y += scale * (x A^T) B^T")
      .def("add_rows", &Plan::add_rows, "add() for contiguous x [T, K] and y [T, N]: (T, x, y, sorted, seg)")
      .def("run", &Plan::run, "shrink (into h) or expand (from h), per the plan's op");
  m.def("f16_to_f32", [](uint16_t v) { return to_f32(f16{v}); });
  m.def("f32_to_f16", [](float v) { return to_f16(v).bits; });
  m.def("f32_to_bf16", [](float v) { return to_bf16(v).bits; });
  m.def("set_threading", [](int64_t min_cost, int max_threads) {
          if (min_cost < 0) throw std::invalid_argument("min_elements: must be >= 0");
          if (max_threads < 0) throw std::invalid_argument("max_threads: must be >= 0 (0: PyTorch's thread count)");
          g_min_parallel_cost = min_cost; g_max_threads = max_threads;
        }, py::arg("min_cost"), py::arg("max_threads"));
  m.def("threading", []() { return py::make_tuple(omp().parallel != nullptr, g_min_parallel_cost, g_max_threads); });
  m.attr("OP_ADD") = static_cast<int>(kAdd);
  m.attr("OP_SHRINK") = static_cast<int>(kShrink);
  m.attr("OP_EXPAND") = static_cast<int>(kExpand);
}
