// The Python module openlora_kernels.ops._cpu_sgmv: the native CPU kernels' binding.
//
// Plain CPython C API (no pybind11: this file compiles in about a second, and a call converts
// its integer arguments with a few PyLong_AsLongLong instead of pybind11's generic machinery).
// Like the CUDA binding it takes raw data pointers (tensor.data_ptr()), sizes and strides in
// elements, and dtype codes: no torch headers, no libtorch, one binary for every torch version.
// The Python side (openlora_kernels/ops/cpu_ext.py) validates everything before calling.
//
// Also here: the work units of a call and their split over threads, the choice of the kernels'
// instruction set at load time (kernels_<isa>_<dtype>.cpp; the best the CPU runs, or
// OPENLORA_CPU_ISA=base|x86-64-v3|x86-64-v4 to cap it), and the batch-metadata build for CPU
// tensors (build_meta: a counting sort, a few microseconds).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>
#if defined(__linux__)
#include <dlfcn.h>
#endif

#include "sgmv_cpu.h"

using namespace openlora::cpu;

namespace {

// ------------------------------------------------------------------ the instruction set

struct IsaKernels {
  const char* name;
  RunFn run[3];   // indexed by DType (x, y and the weights in it)
  RunFn f32_w[2];  // fp32 x / y with weights stored in kF16 / kBF16 (adapter_dtype)
  RunFn bf16_wf16;  // bf16 x / y with fp16 weights
  RunFn e4m3[3];   // x / y of DType with fp8 e4m3 weights (and their scales)
};
// (fp16 on an x86-64-v4 CPU runs the v3 kernels: the rarest dtype on a CPU, one translation unit
// fewer; so do the storage-dtype kernels: a decode step reads 16-bit and 8-bit weights at memory
// speed with AVX2 as well, and the extension's build stays short)
const IsaKernels kV4 = {"x86-64-v4", {v3::run_f16, v4::run_bf16, v4::run_f32}, {v3::run_f32_wf16, v3::run_f32_wbf16},
                        v3::run_bf16_wf16, {v3::run_f16_we4m3, v3::run_bf16_we4m3, v3::run_f32_we4m3}};
const IsaKernels kV3 = {"x86-64-v3", {v3::run_f16, v3::run_bf16, v3::run_f32}, {v3::run_f32_wf16, v3::run_f32_wbf16},
                        v3::run_bf16_wf16, {v3::run_f16_we4m3, v3::run_bf16_we4m3, v3::run_f32_we4m3}};
const IsaKernels kBase = {"baseline", {base::run_f16, base::run_bf16, base::run_f32},
                          {base::run_f32_wf16, base::run_f32_wbf16}, base::run_bf16_wf16,
                          {base::run_f16_we4m3, base::run_bf16_we4m3, base::run_f32_we4m3}};

// Whether the kernels run x / y of `dtype` with weights stored in `w_dtype`.
bool pair_runs(int dtype, int w_dtype) {
  if (dtype < kF16 || dtype > kF32) return false;
  return w_dtype == dtype || w_dtype == kE4M3 || (dtype == kF32 && (w_dtype == kF16 || w_dtype == kBF16)) ||
         (dtype == kBF16 && w_dtype == kF16);
}

// The kernels for the pair (one pair_runs accepts).
RunFn kernels_for(const IsaKernels& k, int dtype, int w_dtype) {
  if (w_dtype == dtype) return k.run[dtype];
  if (w_dtype == kE4M3) return k.e4m3[dtype];
  if (dtype == kBF16) return k.bf16_wf16;
  return k.f32_w[w_dtype];
}
const IsaKernels* const kIsas[] = {&kV4, &kV3, &kBase};   // best first

bool isa_runs(const IsaKernels& k) {
#if defined(OLK_X86_LEVELS)
  if (&k == &kV4) return __builtin_cpu_supports("x86-64-v4");
  if (&k == &kV3) return __builtin_cpu_supports("x86-64-v3");
#endif
  return &k == &kBase;        // (the others are stubs when not built)
}

// The best level that runs here, at most `cap` (a name; empty: no cap). Null for an unknown name.
const IsaKernels* pick_isa(const std::string& cap) {
  bool allowed = cap.empty() || cap == "best";
  for (const IsaKernels* k : kIsas) {
    if (!allowed && (cap == k->name || (cap == "base" && k == &kBase))) allowed = true;
    if (allowed && isa_runs(*k)) return k;
  }
  return allowed ? &kBase : nullptr;
}

const IsaKernels* g_isa = nullptr;

// ---------------------------------------------------------------------------- threads

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
OmpRuntime& omp() { static OmpRuntime rt; return rt; }
int64_t g_min_parallel_cost = 48 * 1024;   // weight elements below which one thread runs a call
int g_max_threads = 0;                      // 0: PyTorch's current intra-op thread count

// The units of one call, in memory order of the slots: each (slice, slot) with rows and a
// non-zero rank, its rows cut into runs of at most kUnitRows (into `units`, cleared first: the
// caller reuses one vector across calls). The cuts are multiples of kBlockRows from the
// segment's start, so a row's arithmetic is the same however many units a segment has.
void make_units(const Args& p, std::vector<Unit>& units) {
  const int64_t n_slices = p.op == kExpand ? p.n_b : p.n_a;
  units.clear();
  if (p.T <= 0 || p.S <= 0 || p.R <= 0) return;   // nothing to do (and the metadata may be null)
  int64_t col = 0;
  for (int64_t i = 0; i < n_slices; ++i) {
    for (int64_t s = 0; s < p.S; ++s) {
      // the segment [start, start + len) clipped to [0, T) of sorted_tokens (int64: no overflow)
      const int64_t start = std::min<int64_t>(std::max<int64_t>(p.seg[s], 0), p.T);
      const int64_t end = std::min<int64_t>(std::max<int64_t>(static_cast<int64_t>(p.seg[s]) + p.seg[p.S + s], start), p.T);
      int64_t r = p.R;
      if (p.ranks != nullptr) {
        const int64_t off = i * p.s_rn + s * p.s_rs;
        r = p.ranks64 ? static_cast<const int64_t*>(p.ranks)[off] : static_cast<const int32_t*>(p.ranks)[off];
      }
      int64_t roff = 0, rmax = p.R;
      if (p.offs != nullptr) {   // packed: rows [off, off + rank) of the slice's buffer, clamped into it
        const int64_t o = p.offs64 ? static_cast<const int64_t*>(p.offs)[s] : static_cast<const int32_t*>(p.offs)[s];
        roff = std::min<int64_t>(std::max<int64_t>(o, 0), p.rows);
        rmax = std::min<int64_t>(rmax, p.rows - roff);
      }
      const int rank = static_cast<int>(std::min<int64_t>(std::max<int64_t>(r, 0), rmax));
      if (end <= start || rank == 0) continue;
      for (int64_t u = start; u < end; u += kUnitRows)
        units.push_back(Unit{i, s, col, u, std::min<int64_t>(kUnitRows, end - u), rank, roff});
    }
    col += p.op == kShrink ? 0 : p.widths[i];
  }
}

// Weight elements a unit touches (its rank rows of A and of B, once per block of rows): the
// cost the threads share.
int64_t unit_cost(const Args& p, const Unit& u) {
  const int64_t n = p.op == kShrink ? 0 : p.widths[u.slice];
  const int64_t k = p.op == kExpand ? 0 : p.K;
  return static_cast<int64_t>(u.rank) * (k + n) * ((u.len + kBlockRows - 1) / kBlockRows) + 64;
}

struct Split {
  const Args* p; const Unit* units; int64_t n; int64_t threads; RunFn fn;
  int64_t next = 0;               // the next unit to claim (atomic builtins)
  std::atomic<bool> oom{false};
};

// One thread's part: its scratch (kept across calls), then runs of consecutive units claimed in
// memory order from the shared counter (run_claimed: each run half the thread's share of what is
// left, the last ones single units): a thread that is slowed down (a busy or preempted core) just
// claims fewer, nobody waits for a fixed share. While a unit computes, its thread prefetches its
// next one (the next of its run, else where its next claim will probably start; otherwise it
// still lands in the shared L3). A thread that cannot get its scratch claims nothing.
void split_worker(void* data) {
  Split& s = *static_cast<Split*>(data);
  static thread_local std::vector<int64_t> rows;
  static thread_local std::vector<float> floats;
  int64_t n_rows = 0, n_floats = 0;
  scratch_size(*s.p, &n_rows, &n_floats);
  try {
    if (static_cast<int64_t>(rows.size()) < n_rows) rows.resize(static_cast<size_t>(n_rows));
    if (static_cast<int64_t>(floats.size()) < n_floats) floats.resize(static_cast<size_t>(n_floats));
  } catch (...) {
    s.oom.store(true);
    return;
  }
  s.fn(*s.p, s.units, s.n, &s.next, s.threads, scratch_at(*s.p, rows.data(), floats.data()));
}

// Runs one call (x / y of `dtype`, weights of `w_dtype`: a pair the Plan checked with
// pair_runs); false when memory ran out (nothing or part of it done).
bool run_split(const Args& p, int dtype, int w_dtype) {
  static thread_local std::vector<Unit> units;      // reused: no allocation per call
  try {
    make_units(p, units);
  } catch (...) {
    return false;
  }
  const int64_t n = static_cast<int64_t>(units.size());
  if (n == 0) return true;
  int threads = 1;
  if (omp().parallel != nullptr && n > 1) {
    int64_t total = 0;
    for (const Unit& u : units) total += unit_cost(p, u);
    if (total >= g_min_parallel_cost) {
      threads = g_max_threads > 0 ? g_max_threads : omp().max_threads();
      threads = static_cast<int>(std::min<int64_t>({static_cast<int64_t>(threads), n, 64}));
    }
  }
  Split s{&p, units.data(), n, threads, kernels_for(*g_isa, dtype, w_dtype)};
  if (threads <= 1) {
    split_worker(&s);
  } else {
    omp().parallel(split_worker, &s, static_cast<unsigned>(threads), 0);
  }
  return s.next >= n;
}

// ------------------------------------------------------------------------------ the plan

const void* ptr(int64_t v) { return reinterpret_cast<const void*>(static_cast<uintptr_t>(v)); }

struct ArgError { const char* type; std::string msg; };   // (type: "value" or "type")

// The weight scales a Plan takes (fp8 storage): per slice a pointer and the (slot, rank) strides.
struct Scales {
  bool has_a = false, has_b = false;
  std::vector<int64_t> a, a_ss, a_sr, b, b_ss, b_sr;
};

// The arguments that do not change from call to call for one layer (its weights, scalings and
// ranks), validated and converted once. A call then passes only the batch: rows, x, y, h and the
// metadata (converting ~20 Python arguments on every call would cost more than a small kernel).
class Plan {
 public:
  Plan(int op, int dtype, int64_t K, int64_t R, int64_t S, const std::vector<int64_t>& a,
       const std::vector<int64_t>& a_ss, const std::vector<int64_t>& a_sr, const std::vector<int64_t>& a_sk,
       const std::vector<int64_t>& b, const std::vector<int64_t>& widths, const std::vector<int64_t>& b_ss,
       const std::vector<int64_t>& b_sn, const std::vector<int64_t>& b_sr, int64_t scal, int64_t ranks,
       bool ranks64, int64_t s_rn, int64_t s_rs, int w_dtype, int64_t offs = 0, bool offs64 = false, int64_t rows = 0,
       const Scales* scales = nullptr)
      : dtype_(dtype), w_dtype_(w_dtype), a_ss_(a_ss), a_sr_(a_sr), a_sk_(a_sk), widths_(widths), b_ss_(b_ss), b_sn_(b_sn), b_sr_(b_sr) {
    if (op < kAdd || op > kExpand) throw ArgError{"value", "op: unknown op code " + std::to_string(op)};
    if (dtype < kF16 || dtype > kF32) throw ArgError{"value", "dtype: unknown dtype code " + std::to_string(dtype)};
    if (!pair_runs(dtype, w_dtype))
      throw ArgError{"value", "w_dtype: weights stored in dtype code " + std::to_string(w_dtype) +
                                  " are not supported with activations of dtype code " + std::to_string(dtype) +
                                  " (the same dtype, fp16 / bf16 weights with fp32 activations, fp16 weights with "
                                  "bf16 activations, or fp8 e4m3 weights with any)"};
    if (K < 0 || R < 0 || S < 0) throw ArgError{"value", "K, R, S: sizes must be >= 0"};
    if (op != kExpand && a.empty()) throw ArgError{"value", "a: no lora_a slices given"};
    if (op != kShrink && (b.empty() || widths.size() != b.size() || b_ss.size() != b.size()))
      throw ArgError{"value", "b: lora_b slices, widths and slot strides must have the same length"};
    if (op == kAdd && a.size() != b.size()) throw ArgError{"value", "a, b: different numbers of slices"};
    if (op != kShrink && scal == 0 && S > 0) throw ArgError{"value", "scalings: null pointer"};
    if (a_ss.size() != a.size() || a_sr.size() != a.size() || a_sk.size() != a.size())
      throw ArgError{"value", "a_ss, a_sr, a_sk: one stride per lora_a slice"};
    if (b_sn.size() != b.size() || b_sr.size() != b.size())
      throw ArgError{"value", "b_sn, b_sr: one stride per lora_b slice"};
    p_.op = op; p_.K = K; p_.R = R; p_.S = S;
    for (int64_t v : a) a_.push_back(ptr(v));
    for (int64_t v : b) b_.push_back(ptr(v));
    p_.a = a_.data(); p_.n_a = static_cast<int64_t>(a_.size());
    p_.a_ss = a_ss_.data(); p_.a_sr = a_sr_.data(); p_.a_sk = a_sk_.data();
    p_.b = b_.data(); p_.widths = widths_.data(); p_.n_b = static_cast<int64_t>(b_.size());
    p_.b_ss = b_ss_.data(); p_.b_sn = b_sn_.data(); p_.b_sr = b_sr_.data();
    for (int64_t w : widths_) n_total_ += w;
    p_.scal = static_cast<const float*>(ptr(scal));
    p_.ranks = ranks ? ptr(ranks) : nullptr; p_.ranks64 = ranks64; p_.s_rn = s_rn; p_.s_rs = s_rs;
    if (offs != 0 && rows < 0) throw ArgError{"value", "rows: must be >= 0"};
    p_.offs = offs ? ptr(offs) : nullptr; p_.offs64 = offs64; p_.rows = rows;
    // the weight scales (fp8 storage requires those of the sides the op reads)
    const bool need_a = op != kExpand, need_b = op != kShrink;
    if (scales != nullptr && scales->has_a && need_a) {
      if (scales->a.size() != a.size() || scales->a_ss.size() != a.size() || scales->a_sr.size() != a.size())
        throw ArgError{"value", "a_scale: one scale pointer and two strides per lora_a slice"};
      for (int64_t v : scales->a) {
        if (v == 0 && R > 0 && S > 0) throw ArgError{"value", "a_scale: null pointer"};
        a_sc_.push_back(static_cast<const float*>(ptr(v)));
      }
      a_sc_ss_ = scales->a_ss; a_sc_sr_ = scales->a_sr;
      p_.a_sc = a_sc_.data(); p_.a_sc_ss = a_sc_ss_.data(); p_.a_sc_sr = a_sc_sr_.data();
    }
    if (scales != nullptr && scales->has_b && need_b) {
      if (scales->b.size() != b.size() || scales->b_ss.size() != b.size() || scales->b_sr.size() != b.size())
        throw ArgError{"value", "b_scale: one scale pointer and two strides per lora_b slice"};
      for (int64_t v : scales->b) {
        if (v == 0 && R > 0 && S > 0) throw ArgError{"value", "b_scale: null pointer"};
        b_sc_.push_back(static_cast<const float*>(ptr(v)));
      }
      b_sc_ss_ = scales->b_ss; b_sc_sr_ = scales->b_sr;
      p_.b_sc = b_sc_.data(); p_.b_sc_ss = b_sc_ss_.data(); p_.b_sc_sr = b_sc_sr_.data();
    }
    if (w_dtype == kE4M3 && ((need_a && p_.a_sc == nullptr) || (need_b && p_.b_sc == nullptr)))
      throw ArgError{"value", std::string(need_a && p_.a_sc == nullptr ? "a_scale" : "b_scale") +
                                  ": fp8 (e4m3) weights need their scales"};
  }
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;

  // add (fused): y[T, N] += ...; x [T, K]. False: out of memory.
  bool add(int64_t T, int64_t x, int64_t sx_t, int64_t sx_k, int64_t y, int64_t sy_t, int64_t sy_n,
           int64_t sorted, int64_t seg) {
    if (p_.op != kAdd) throw ArgError{"value", "plan: not an add plan"};
    Args p = batch(T, sorted, seg);
    p.x = ptr(x); p.sx_t = sx_t; p.sx_k = sx_k;
    p.y = const_cast<void*>(ptr(y)); p.sy_t = sy_t; p.sy_n = sy_n;
    return dispatch(p);
  }

  // add for contiguous x [T, K] and y [T, sum of widths] (what a patched linear layer passes).
  bool add_rows(int64_t T, int64_t x, int64_t y, int64_t sorted, int64_t seg) {
    return add(T, x, p_.K, 1, y, n_total_, 1, sorted, seg);
  }

  // shrink: h[n, T, R] fp32 (zero-filled by the caller) from x; expand: y from h (any float dtype)
  bool run(int64_t T, int64_t x, int64_t sx_t, int64_t sx_k, int64_t y, int64_t sy_t, int64_t sy_n,
           int64_t h, int64_t h_dtype, int64_t sh_n, int64_t sh_t, int64_t sh_r, int64_t sorted, int64_t seg) {
    // (an empty h, T == 0 or R == 0, may have a null data pointer: nothing is read or written then)
    if (p_.op != kAdd && h == 0 && T > 0 && p_.R > 0)
      throw ArgError{"value", "h: the intermediate is required for shrink / expand"};
    if (h_dtype < kF16 || h_dtype > kF32) throw ArgError{"value", "h_dtype: unknown dtype code"};
    Args p = batch(T, sorted, seg);
    p.x = ptr(x); p.sx_t = sx_t; p.sx_k = sx_k;
    p.y = const_cast<void*>(ptr(y)); p.sy_t = sy_t; p.sy_n = sy_n;
    p.h = const_cast<void*>(ptr(h)); p.h_dtype = static_cast<int>(h_dtype); p.sh_n = sh_n; p.sh_t = sh_t; p.sh_r = sh_r;
    return dispatch(p);
  }

 private:
  Args batch(int64_t T, int64_t sorted, int64_t seg) const {
    if (T < 0) throw ArgError{"value", "T: must be >= 0"};
    // Empty metadata tensors (T == 0 rows, S == 0 slots) may have null data pointers: no unit
    // is made then (make_units), so nothing is read through them.
    if ((sorted == 0 && T > 0) || (seg == 0 && p_.S > 0)) throw ArgError{"value", "metadata: null pointer"};
    Args p = p_;
    p.T = T;
    p.sorted = static_cast<const int32_t*>(ptr(sorted));
    p.seg = static_cast<const int32_t*>(ptr(seg));
    return p;
  }
  bool dispatch(const Args& p) const {
    bool ok;
    Py_BEGIN_ALLOW_THREADS
    ok = run_split(p, dtype_, w_dtype_);
    Py_END_ALLOW_THREADS
    return ok;
  }
  Args p_;                                   // its per-slice arrays point into the vectors below
  int dtype_, w_dtype_;
  std::vector<const void*> a_, b_;
  std::vector<int64_t> a_ss_, a_sr_, a_sk_, widths_, b_ss_, b_sn_, b_sr_;
  std::vector<const float*> a_sc_, b_sc_;
  std::vector<int64_t> a_sc_ss_, a_sc_sr_, b_sc_ss_, b_sc_sr_;
  int64_t n_total_ = 0;
};

// ------------------------------------------------------------------------ batch metadata

// The batch metadata of metadata.py (_build_impl) for CPU indices, by a stable counting sort:
// token_slots [T], sorted_tokens [T], seg_info [2, S], tile_info [3, G] (int32, preallocated).
// Returns -1, or the first position whose index is outside [-1, S) (nothing is written then
// that the caller keeps). G must be metadata.max_tiles(T, S, bm); tiles beyond it are not made.
int64_t build_meta(const void* idx, bool idx64, int64_t T, int64_t S, int64_t bm, int64_t G, int32_t* ts,
                   int32_t* st, int32_t* seg, int32_t* tile) {
  for (int64_t t = 0; t < T; ++t) {
    const int64_t v = idx64 ? static_cast<const int64_t*>(idx)[t] : static_cast<const int32_t*>(idx)[t];
    if (v < -1 || v >= S) return t;
    ts[t] = static_cast<int32_t>(v);
  }
  int32_t* start = seg;            // seg_info[0]: start of each slot's segment
  int32_t* len = seg + S;          // seg_info[1]: its length
  for (int64_t s = 0; s < S; ++s) len[s] = 0;
  for (int64_t t = 0; t < T; ++t)
    if (ts[t] >= 0) ++len[ts[t]];
  static thread_local std::vector<int64_t> pos;    // next free position of each slot
  pos.resize(static_cast<size_t>(S) + 1);
  int64_t acc = 0;
  for (int64_t s = 0; s < S; ++s) {
    start[s] = static_cast<int32_t>(acc);
    pos[s] = acc;
    acc += len[s];
  }
  pos[S] = acc;                    // rows without adapter, after every segment
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = ts[t] >= 0 ? ts[t] : S;
    st[pos[s]++] = static_cast<int32_t>(t);
  }
  int64_t g = 0;
  for (int64_t s = 0; s < S && g < G; ++s) {
    const int64_t e = static_cast<int64_t>(start[s]) + len[s];
    for (int64_t b = start[s]; b < e && g < G; b += bm, ++g) {
      tile[g] = static_cast<int32_t>(s);
      tile[G + g] = static_cast<int32_t>(b);
      tile[2 * G + g] = static_cast<int32_t>(std::min<int64_t>(b + bm, e));
    }
  }
  for (; g < G; ++g) {
    tile[g] = -1;
    tile[G + g] = 0;
    tile[2 * G + g] = 0;
  }
  return -1;
}

// ------------------------------------------------------------------------ Python glue

bool as_i64(PyObject* o, int64_t* out) {
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) return false;
  *out = static_cast<int64_t>(v);
  return true;
}

template <size_t N>
bool i64_args(PyObject* const* args, Py_ssize_t nargs, int64_t (&out)[N], const char* fname) {
  if (nargs != static_cast<Py_ssize_t>(N)) {
    PyErr_Format(PyExc_TypeError, "%s: expected %zd arguments, got %zd", fname, static_cast<Py_ssize_t>(N), nargs);
    return false;
  }
  for (size_t i = 0; i < N; ++i)
    if (!as_i64(args[i], &out[i])) return false;
  return true;
}

// A list / tuple of ints; with `n` >= 0 an int is also taken, as n copies of it.
bool i64_list(PyObject* o, Py_ssize_t n, std::vector<int64_t>& out, const char* name) {
  out.clear();
  if (n >= 0 && PyLong_Check(o)) {
    int64_t v;
    if (!as_i64(o, &v)) return false;
    out.assign(static_cast<size_t>(n), v);
    return true;
  }
  PyObject* seq = PySequence_Fast(o, "");
  if (seq == nullptr) {
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError, "%s: expected a list of ints%s", name, n >= 0 ? " or an int" : "");
    return false;
  }
  const Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
  bool ok = true;
  for (Py_ssize_t i = 0; i < len && ok; ++i) {
    int64_t v;
    ok = as_i64(PySequence_Fast_GET_ITEM(seq, i), &v);
    if (ok) out.push_back(v);
  }
  Py_DECREF(seq);
  return ok;
}

void set_error(const ArgError& e) {
  PyErr_SetString(e.type[0] == 't' ? PyExc_TypeError : PyExc_ValueError, e.msg.c_str());
}

struct PyPlan {
  PyObject_HEAD
  Plan* plan;
};

int plan_init(PyObject* self, PyObject* args, PyObject* kwargs) {
  int op, dtype, ranks64, offs64 = 0, w_dtype = -1;
  long long K, R, S, scal, ranks, s_rn, s_rs, offs = 0, rows = 0;
  PyObject *a, *a_ss, *a_sr, *a_sk, *b, *widths, *b_ss, *b_sn, *b_sr;
  PyObject *asc = Py_None, *asc_ss = Py_None, *asc_sr = Py_None, *bsc = Py_None, *bsc_ss = Py_None, *bsc_sr = Py_None;
  static const char* names[] = {"op", "dtype", "K", "R", "S", "a", "a_ss", "a_sr", "a_sk", "b", "widths", "b_ss",
                                "b_sn", "b_sr", "scal", "ranks", "ranks64", "s_rn", "s_rs", "offs", "offs64",
                                "rows", "w_dtype", "a_scale", "a_scale_ss", "a_scale_sr", "b_scale", "b_scale_ss",
                                "b_scale_sr", nullptr};
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iiLLLOOOOOOOOOLLpLL|LpLiOOOOOO:Plan", const_cast<char**>(names), &op,
                                   &dtype, &K, &R, &S, &a, &a_ss, &a_sr, &a_sk, &b, &widths, &b_ss, &b_sn, &b_sr,
                                   &scal, &ranks, &ranks64, &s_rn, &s_rs, &offs, &offs64, &rows, &w_dtype, &asc,
                                   &asc_ss, &asc_sr, &bsc, &bsc_ss, &bsc_sr))
    return -1;
  if (w_dtype < 0) w_dtype = dtype;       // (not given: the weights have the activations' dtype)
  std::vector<int64_t> va, vass, vasr, vask, vb, vw, vbss, vbsn, vbsr;
  if (!i64_list(a, -1, va, "a") || !i64_list(b, -1, vb, "b") || !i64_list(widths, -1, vw, "widths")) return -1;
  const Py_ssize_t na = static_cast<Py_ssize_t>(va.size()), nb = static_cast<Py_ssize_t>(vb.size());
  if (!i64_list(a_ss, na, vass, "a_ss") || !i64_list(a_sr, na, vasr, "a_sr") || !i64_list(a_sk, na, vask, "a_sk") ||
      !i64_list(b_ss, nb, vbss, "b_ss") || !i64_list(b_sn, nb, vbsn, "b_sn") || !i64_list(b_sr, nb, vbsr, "b_sr"))
    return -1;
  Scales sc;         // (a_scale / b_scale: lists of pointers, their strides lists or ints; None: no scales)
  sc.has_a = asc != Py_None;
  sc.has_b = bsc != Py_None;
  if (sc.has_a && (!i64_list(asc, -1, sc.a, "a_scale") ||
                   !i64_list(asc_ss, static_cast<Py_ssize_t>(sc.a.size()), sc.a_ss, "a_scale_ss") ||
                   !i64_list(asc_sr, static_cast<Py_ssize_t>(sc.a.size()), sc.a_sr, "a_scale_sr")))
    return -1;
  if (sc.has_b && (!i64_list(bsc, -1, sc.b, "b_scale") ||
                   !i64_list(bsc_ss, static_cast<Py_ssize_t>(sc.b.size()), sc.b_ss, "b_scale_ss") ||
                   !i64_list(bsc_sr, static_cast<Py_ssize_t>(sc.b.size()), sc.b_sr, "b_scale_sr")))
    return -1;
  PyPlan* pp = reinterpret_cast<PyPlan*>(self);
  try {
    Plan* plan = new Plan(op, dtype, K, R, S, va, vass, vasr, vask, vb, vw, vbss, vbsn, vbsr, scal, ranks,
                          ranks64 != 0, s_rn, s_rs, w_dtype, offs, offs64 != 0, rows, &sc);
    delete pp->plan;
    pp->plan = plan;
  } catch (const ArgError& e) {
    set_error(e);
    return -1;
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
    return -1;
  }
  return 0;
}

void plan_dealloc(PyObject* self) {
  PyTypeObject* tp = Py_TYPE(self);
  delete reinterpret_cast<PyPlan*>(self)->plan;
  tp->tp_free(self);
  Py_DECREF(tp);
}

Plan* plan_of(PyObject* self) {
  Plan* p = reinterpret_cast<PyPlan*>(self)->plan;
  if (p == nullptr) PyErr_SetString(PyExc_ValueError, "plan: not initialised");
  return p;
}

PyObject* finish(bool ok) {
  if (!ok) return PyErr_NoMemory();
  Py_RETURN_NONE;
}

template <typename F>
PyObject* guarded(F&& f) {
  try {
    return f();
  } catch (const ArgError& e) {
    set_error(e);
    return nullptr;
  }
}

PyObject* plan_add(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  int64_t v[9];
  Plan* p = plan_of(self);
  if (p == nullptr || !i64_args(args, nargs, v, "add")) return nullptr;
  return guarded([&] { return finish(p->add(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8])); });
}

PyObject* plan_add_rows(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  int64_t v[5];
  Plan* p = plan_of(self);
  if (p == nullptr || !i64_args(args, nargs, v, "add_rows")) return nullptr;
  return guarded([&] { return finish(p->add_rows(v[0], v[1], v[2], v[3], v[4])); });
}

PyObject* plan_run(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  int64_t v[14];
  Plan* p = plan_of(self);
  if (p == nullptr || !i64_args(args, nargs, v, "run")) return nullptr;
  return guarded([&] {
    return finish(p->run(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11], v[12], v[13]));
  });
}

#define OLK_FAST(f) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(f)), METH_FASTCALL

PyMethodDef plan_methods[] = {
    {"add", OLK_FAST(plan_add),
     "add(T, x, sx_t, sx_k, y, sy_t, sy_n, sorted, seg): fused shrink + expand, y += scale * (x A^T) B^T"},
    {"add_rows", OLK_FAST(plan_add_rows), "add_rows(T, x, y, sorted, seg): add() for contiguous x [T, K] and y [T, N]"},
    {"run", OLK_FAST(plan_run),
     "run(T, x, sx_t, sx_k, y, sy_t, sy_n, h, h_dtype, sh_n, sh_t, sh_r, sorted, seg): shrink (into h) or expand "
     "(from h), per the plan's op"},
    {nullptr, nullptr, 0, nullptr}};

PyType_Slot plan_slots[] = {
    {Py_tp_doc, const_cast<char*>("Plan(op, dtype, K, R, S, a, a_ss, a_sr, a_sk, b, widths, b_ss, b_sn, b_sr, scal, "
                                  "ranks, ranks64, s_rn, s_rs[, offs, offs64, rows, w_dtype, a_scale, a_scale_ss, a_scale_sr, b_scale, "
                                  "b_scale_ss, b_scale_sr]): one layer's static arguments (strides per slice: a list, or "
                                  "an int for all; w_dtype: the weights' storage dtype, default dtype, 3 for fp8 e4m3; "
                                  "a_scale / b_scale: per slice the pointer of the float32 [S, R] scales of fp8 "
                                  "weights, with their slot and rank strides); add() / add_rows() / run() per batch")},
    {Py_tp_new, reinterpret_cast<void*>(PyType_GenericNew)},
    {Py_tp_init, reinterpret_cast<void*>(plan_init)},
    {Py_tp_dealloc, reinterpret_cast<void*>(plan_dealloc)},
    {Py_tp_methods, plan_methods},
    {0, nullptr}};

PyType_Spec plan_spec = {"openlora_kernels.ops._cpu_sgmv.Plan", sizeof(PyPlan), 0, Py_TPFLAGS_DEFAULT, plan_slots};

PyObject* m_f16_to_f32(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t v[1];
  if (!i64_args(args, nargs, v, "f16_to_f32")) return nullptr;
  return PyFloat_FromDouble(to_f32(f16{static_cast<uint16_t>(v[0])}));
}

bool one_float(PyObject* const* args, Py_ssize_t nargs, float* out) {
  if (nargs != 1) {
    PyErr_SetString(PyExc_TypeError, "expected one float");
    return false;
  }
  const double d = PyFloat_AsDouble(args[0]);
  if (d == -1.0 && PyErr_Occurred()) return false;
  *out = static_cast<float>(d);
  return true;
}

PyObject* m_f32_to_f16(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  float f;
  if (!one_float(args, nargs, &f)) return nullptr;
  return PyLong_FromLong(to_f16(f).bits);
}

PyObject* m_f32_to_bf16(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  float f;
  if (!one_float(args, nargs, &f)) return nullptr;
  return PyLong_FromLong(to_bf16(f).bits);
}

PyObject* m_set_threading(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t v[2];
  if (!i64_args(args, nargs, v, "set_threading")) return nullptr;
  if (v[0] < 0) return PyErr_Format(PyExc_ValueError, "min_elements: must be >= 0");
  if (v[1] < 0 || v[1] > 1 << 20)
    return PyErr_Format(PyExc_ValueError, "max_threads: must be >= 0 (0: PyTorch's thread count)");
  g_min_parallel_cost = v[0];
  g_max_threads = static_cast<int>(v[1]);
  Py_RETURN_NONE;
}

PyObject* m_threading(PyObject*, PyObject*) {
  return Py_BuildValue("(OLi)", omp().parallel != nullptr ? Py_True : Py_False,
                       static_cast<long long>(g_min_parallel_cost), g_max_threads);
}

PyObject* m_isa(PyObject*, PyObject*) { return PyUnicode_FromString(g_isa->name); }

PyObject* m_isas(PyObject*, PyObject*) {     // the levels that run here, best first
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  for (const IsaKernels* k : kIsas) {
    if (!isa_runs(*k)) continue;
    PyObject* s = PyUnicode_FromString(k->name);
    if (s == nullptr || PyList_Append(out, s) < 0) {
      Py_XDECREF(s);
      Py_DECREF(out);
      return nullptr;
    }
    Py_DECREF(s);
  }
  return out;
}

PyObject* m_set_isa(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  const char* name = nargs == 1 ? PyUnicode_AsUTF8(args[0]) : nullptr;
  if (name == nullptr) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "set_isa: expected one str");
    return nullptr;
  }
  const IsaKernels* k = pick_isa(name);
  if (k == nullptr)
    return PyErr_Format(PyExc_ValueError, "isa: unknown instruction set %R (best, x86-64-v4, x86-64-v3, base)", args[0]);
  g_isa = k;
  return PyUnicode_FromString(k->name);
}

PyObject* m_build_meta(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t v[10];   // idx, idx64, T, S, bm, G, token_slots, sorted_tokens, seg_info, tile_info
  if (!i64_args(args, nargs, v, "build_meta")) return nullptr;
  if (v[2] < 0 || v[3] < 0 || v[4] < 1 || v[5] < 0) return PyErr_Format(PyExc_ValueError, "build_meta: bad sizes");
  if ((v[2] > 0 && (v[0] == 0 || v[6] == 0 || v[7] == 0)) || (v[3] > 0 && v[8] == 0) || (v[5] > 0 && v[9] == 0))
    return PyErr_Format(PyExc_ValueError, "build_meta: null pointer");
  int64_t bad;
  try {
    bad = build_meta(ptr(v[0]), v[1] != 0, v[2], v[3], v[4], v[5], reinterpret_cast<int32_t*>(v[6]),
                     reinterpret_cast<int32_t*>(v[7]), reinterpret_cast<int32_t*>(v[8]), reinterpret_cast<int32_t*>(v[9]));
  } catch (const std::bad_alloc&) {
    return PyErr_NoMemory();
  }
  return PyLong_FromLongLong(bad);
}

PyMethodDef module_methods[] = {
    {"f16_to_f32", OLK_FAST(m_f16_to_f32), "the float of a half's bits"},
    {"f32_to_f16", OLK_FAST(m_f32_to_f16), "the half bits of a float (round to nearest even)"},
    {"f32_to_bf16", OLK_FAST(m_f32_to_bf16), "the bfloat16 bits of a float (round to nearest even)"},
    {"set_threading", OLK_FAST(m_set_threading), "set_threading(min_cost, max_threads)"},
    {"threading", m_threading, METH_NOARGS, "(OpenMP runtime found, min_cost, max_threads)"},
    {"isa", m_isa, METH_NOARGS, "the instruction set the kernels run with"},
    {"isas", m_isas, METH_NOARGS, "the instruction sets the kernels can run with here, best first"},
    {"set_isa", OLK_FAST(m_set_isa), "set_isa(name): the best level that runs here, at most name; returns it"},
    {"build_meta", OLK_FAST(m_build_meta),
     "build_meta(idx, idx64, T, S, block_m, G, token_slots, sorted_tokens, seg_info, tile_info) -> -1 or the "
     "first position of an index outside [-1, S)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cpu_sgmv",
                          "openlora_kernels native CPU multi-LoRA kernels (raw pointers; see ops/cpu_ext.py)", -1,
                          module_methods};

}  // namespace

PyMODINIT_FUNC PyInit__cpu_sgmv(void) {
  if (g_isa == nullptr) {
    const char* env = std::getenv("OPENLORA_CPU_ISA");
    g_isa = pick_isa(env != nullptr ? env : "");
    if (g_isa == nullptr) g_isa = pick_isa("");
  }
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  PyObject* plan_type = PyType_FromSpec(&plan_spec);
  if (plan_type == nullptr || PyModule_AddObject(m, "Plan", plan_type) < 0) {
    Py_XDECREF(plan_type);
    Py_DECREF(m);
    return nullptr;
  }
  if (PyModule_AddIntConstant(m, "OP_ADD", kAdd) < 0 || PyModule_AddIntConstant(m, "OP_SHRINK", kShrink) < 0 ||
      PyModule_AddIntConstant(m, "OP_EXPAND", kExpand) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
