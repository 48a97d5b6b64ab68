// Instance normalization CPU kernel. The maths and the symbol names (mean,
// mu, rstd, d, k, c1, c2, the (N, A, C, B) view) are those of the module
// docstring of mx_instnorm/kernel/instance_norm.py, which holds the
// derivation; this file only says how each quantity is computed.
//
// Statistics: every instance is shifted by its first element K (d = x - K,
// exact or nearly so for data with a large common offset) and reduced in
// chunks that stay in cache: each chunk gets its own two-pass mean and sum
// of squared deviations in the accumulation dtype, and the chunks are
// merged in double with Chan's pairwise formula. mu = mean(d), mean = K + mu,
// and y is computed from (x - K) - mu, never from x - mean, so an offset of
// 1e4 in float32 costs no digits. An instance whose squares overflow (|x|
// around 1e19 and above in float32) is reduced again in double, scaled by
// its largest deviation, so y is not silently beta.
//
// Backward: no statistics are saved (see lib_instance_norm.cc for why);
// one fused pass over (dy, x) per instance gives sum(d), sum(d^2), sum(g)
// and sum(g d) with d = x - K, hence mu, var, c1 and c2 (an instance whose
// K lies far out in it is reduced again, exactly). Then one pass writes dx.
//
// Threads: std::thread workers created per call (no OpenMP, no persistent
// pool: a process forked after a call can use the kernel), taking work
// items from an atomic counter. An instance is always reduced by one
// thread in a fixed order and the per-(n, c) parameter-gradient partials
// are summed over n in order afterwards: bitwise identical results for
// every thread count.
#include "instance_norm.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
#define MX_INSTNORM_F16C 1
#endif

#if defined(__linux__)
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// Generic x86-64 code plus AVX2/AVX-512 clones chosen at load time; never
// -march=native (a library built on an AVX-512 machine must still run on
// one without it).
#define MX_INSTNORM_HOT __attribute__((target_clones("arch=x86-64-v3", "avx512f", "default")))
#else
#define MX_INSTNORM_HOT
#endif
#define MX_INSTNORM_INLINE inline __attribute__((always_inline))
// No fused multiply-adds (setup.py builds with -ffp-contract=off): GCC
// contracts a * b + c wherever the target has FMA (the AVX2 and AVX-512
// clones, not the generic one) and wherever the loop's shape lets it, so
// the same data gave different bits on different CPUs and on the F16C and
// portable float16 paths. Measured, float32 (16, 128, 64, 64), 2 threads,
// load 2 on 2 cores, interleaved in one process: medians 1-7% slower than
// with contraction.
#if defined(__GNUC__) && !defined(__clang__)
// The 64-byte vectors below never cross a function boundary (always
// inlined, internal linkage): GCC's note that passing them changes the ABI
// without AVX-512 does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace mx_instnorm {

namespace {

// Half-precision storage types, converted to and from float with integer
// arithmetic written so that GCC vectorizes it in every target_clones clone
// (AVX2: 8 lanes, AVX-512: 16). GCC 12 converts _Float16 one element at a
// time (vcvtph2ps with F16C, a libgcc call without), which made float16
// 15-18x slower than float32; these are exact (widening) and round to
// nearest even (narrowing), bit for bit what F16C's vcvtps2ph (imm 4 under
// the default MXCSR) and NumPy give, on every clone and thread count.
struct half_t { uint16_t bits; };  // IEEE binary16
struct bf16_t { uint16_t bits; };  // bfloat16: the top half of a float32

MX_INSTNORM_INLINE float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
MX_INSTNORM_INLINE uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// binary16 -> float32 bits: normals rebias the exponent (+112), inf/NaN
// keep an all-ones exponent, subnormals are em * 2^-24 (an exact int to
// float conversion and a power-of-two scaling with a normal result).
MX_INSTNORM_INLINE uint32_t half_bits_to_float_bits(uint32_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, em = h & 0x7fffu;
  const uint32_t normal = (em << 13) + (112u << 23);
  const uint32_t special = (em << 13) | 0x7f800000u;
  const uint32_t sub = float_to_bits(static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f);
  // Masks rather than ?: so that GCC sees no branch around the float
  // multiply (which it may not speculate) and vectorizes the loop.
  const uint32_t is_sub = 0u - static_cast<uint32_t>(em < 0x400u);
  const uint32_t is_special = 0u - static_cast<uint32_t>(em >= 0x7c00u);
  return sign | (sub & is_sub) | (special & is_special) | (normal & ~(is_sub | is_special));
}

// float32 bits -> binary16, round to nearest even. Normals: rebias and
// round at bit 13; overflow (>= 65520) gives inf; NaN stays a (quiet) NaN
// with the top payload bits; subnormals: the significand with its hidden
// bit shifted right by 126 - exponent, rounded to nearest even.
MX_INSTNORM_INLINE uint16_t float_bits_to_half_bits(uint32_t x) {
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  const uint32_t normal = (ax + 0xc8000fffu + ((ax >> 13) & 1u)) >> 13;
  const uint32_t e = ax >> 23;
  const uint32_t shift = std::max<uint32_t>(1u, std::min<uint32_t>(126u - std::min<uint32_t>(e, 125u), 31u));
  const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  const uint32_t sub = (m + ((1u << (shift - 1)) - 1u) + ((m >> shift) & 1u)) >> shift;
  const uint32_t nan = 0x7e00u | ((ax >> 13) & 0x3ffu);
  // Masks, not ?: (GCC leaves branches in a loop unvectorized).
  const uint32_t is_nan = 0u - static_cast<uint32_t>(ax > 0x7f800000u);
  const uint32_t is_big = 0u - static_cast<uint32_t>(ax >= 0x477ff000u);  // inf, NaN too
  const uint32_t is_normal = 0u - static_cast<uint32_t>(ax >= 0x38800000u);
  const uint32_t r = (nan & is_nan) | (0x7c00u & is_big & ~is_nan) |
                     (normal & is_normal & ~is_big) | (sub & ~is_normal);
  return static_cast<uint16_t>(sign | r);
}

// float32 bits -> bfloat16, round to nearest even; NaN stays a quiet NaN.
MX_INSTNORM_INLINE uint16_t float_bits_to_bf16_bits(uint32_t x) {
  const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const uint32_t nan = (x >> 16) | 0x40u;
  const uint32_t is_nan = 0u - static_cast<uint32_t>((x & 0x7fffffffu) > 0x7f800000u);
  return static_cast<uint16_t>((nan & is_nan) | (rounded & ~is_nan));
}

MX_INSTNORM_INLINE float widen(half_t h) { return bits_to_float(half_bits_to_float_bits(h.bits)); }
MX_INSTNORM_INLINE float widen(bf16_t h) { return bits_to_float(static_cast<uint32_t>(h.bits) << 16); }
template <class T> MX_INSTNORM_INLINE T narrow(float v) { return static_cast<T>(v); }
template <> MX_INSTNORM_INLINE half_t narrow<half_t>(float v) {
  return {float_bits_to_half_bits(float_to_bits(v))};
}
template <> MX_INSTNORM_INLINE bf16_t narrow<bf16_t>(float v) {
  return {float_bits_to_bf16_bits(float_to_bits(v))};
}

MX_INSTNORM_INLINE float widen(float v) { return v; }
MX_INSTNORM_INLINE double widen(double v) { return v; }
template <class T> MX_INSTNORM_INLINE T narrow(double v) { return static_cast<T>(v); }

template <class T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

constexpr int64_t kChunk = 2048;           // contiguous elements per chunk
constexpr int64_t kRowChunk = 128;         // rows per chunk, channels-last
// Columns per work item, channels-last: whole rows of up to 1 KiB of
// float32 (measured on (16, 4096, 128): 64 columns took 1.5-2x longer).
constexpr int64_t kColBlock = 256;
constexpr int64_t kGroupBytes = 64 << 10;  // data per work item, channels-first
// Below this many input bytes a second thread costs more than it saves.
// Measured forward+backward, float32, with the other core busy (load 3-5
// on 2 cores), 1 vs 2 threads: 1 MiB 694 vs 746 us, 2 MiB 1245 vs 1063 us
// (best of 100), 4 MiB 2279 vs 1791 us: most of a small call is page
// faults on the fresh outputs, which do not run in parallel.
constexpr size_t kParallelMinBytes = 2 << 20;
constexpr size_t kBytesPerThread = 256 << 10;
constexpr size_t kHugePageMinBytes = 4 << 20;

// Partial sums are kept in 64-byte GCC vectors (16 floats or 8 doubles):
// written as plain lane arrays, GCC vectorized the loop over chunks instead
// of the lanes, with permutes, and the backward sums ran at a third of the
// speed. The lanes are reduced in a fixed tree, the same on every path.
template <class AccT> struct Vec;
template <> struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  static constexpr int lanes = 16;
};
template <> struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  static constexpr int lanes = 8;
};

typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef int32_t I32x16 __attribute__((vector_size(64)));

// 16 float16 values widened as whole vectors: the same integer steps as
// half_bits_to_float_bits, lane-wise.
MX_INSTNORM_INLINE Vec<float>::type load_half16(const half_t* p) {
  U16x16 raw;
  std::memcpy(&raw, p, sizeof(raw));
  const U32x16 h = __builtin_convertvector(raw, U32x16);
  const U32x16 sign = (h & 0x8000u) << 16, em = h & 0x7fffu;
  const U32x16 normal = (em << 13) + (112u << 23);
  const U32x16 special = (em << 13) | 0x7f800000u;
  const Vec<float>::type subf =
      __builtin_convertvector(reinterpret_cast<const I32x16&>(em), Vec<float>::type) * 0x1p-24f;
  const U32x16 sub = reinterpret_cast<const U32x16&>(subf);
  const U32x16 bits = sign | (em < 0x400u ? sub : em >= 0x7c00u ? special : normal);
  return reinterpret_cast<const Vec<float>::type&>(bits);
}

MX_INSTNORM_INLINE Vec<float>::type load_bf16x16(const bf16_t* p) {
  U16x16 raw;
  std::memcpy(&raw, p, sizeof(raw));
  const U32x16 bits = __builtin_convertvector(raw, U32x16) << 16;
  return reinterpret_cast<const Vec<float>::type&>(bits);
}

// 16 floats narrowed as whole vectors: the same integer steps (and so the
// same bits) as float_bits_to_half_bits / float_bits_to_bf16_bits.
MX_INSTNORM_INLINE void store_half16(half_t* q, Vec<float>::type v) {
  const U32x16 x = reinterpret_cast<const U32x16&>(v);
  const U32x16 sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  const U32x16 normal = (ax + 0xc8000fffu + ((ax >> 13) & 1u)) >> 13;
  const U32x16 e = ax >> 23;
  const U32x16 e_lim = e < 125u ? e : U32x16{} + 125u;
  const U32x16 shift0 = 126u - e_lim;
  const U32x16 shift = shift0 > 31u ? U32x16{} + 31u : shift0;
  const U32x16 m = (ax & 0x7fffffu) | 0x800000u;
  const U32x16 sub = (m + ((1u << (shift - 1u)) - 1u) + ((m >> shift) & 1u)) >> shift;
  const U32x16 nan = 0x7e00u | ((ax >> 13) & 0x3ffu);
  const U32x16 is_nan = (U32x16)(ax > 0x7f800000u);
  const U32x16 is_big = (U32x16)(ax >= 0x477ff000u);
  const U32x16 is_normal = (U32x16)(ax >= 0x38800000u);
  const U32x16 r = (nan & is_nan) | (0x7c00u & is_big & ~is_nan) |
                   (normal & is_normal & ~is_big) | (sub & ~is_normal);
  const U16x16 out = __builtin_convertvector(sign | r, U16x16);
  std::memcpy(q, &out, sizeof(out));
}

MX_INSTNORM_INLINE void store_bf16x16(bf16_t* q, Vec<float>::type v) {
  const U32x16 x = reinterpret_cast<const U32x16&>(v);
  const U32x16 rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const U32x16 nan = (x >> 16) | 0x40u;
  const U32x16 is_nan = (U32x16)((x & 0x7fffffffu) > 0x7f800000u);
  const U16x16 out = __builtin_convertvector((nan & is_nan) | (rounded & ~is_nan), U16x16);
  std::memcpy(q, &out, sizeof(out));
}

template <class T> struct IsHalf : std::false_type {};
template <> struct IsHalf<half_t> : std::true_type {};
template <> struct IsHalf<bf16_t> : std::true_type {};

MX_INSTNORM_INLINE void store(half_t* q, Vec<float>::type v) { store_half16(q, v); }
MX_INSTNORM_INLINE void store(bf16_t* q, Vec<float>::type v) { store_bf16x16(q, v); }

// float16 through F16C. The hot loops are target_clones functions, into
// which GCC 12 neither inlines target("f16c") code nor vectorizes _Float16
// conversions; so float16 data is converted a chunk at a time (at most
// kChunk elements, cache-resident) by these separately compiled helpers
// and the float32 loops run on the chunk. vcvtph2ps widens exactly and
// vcvtps2ph with _MM_FROUND_TO_NEAREST_INT rounds to nearest even whatever
// the MXCSR says (neither conversion honours DAZ/FTZ): the same bits as
// half_bits_to_float_bits / float_bits_to_half_bits, so results do not
// depend on which path ran (tests/test_half.py compares them). Chosen per
// call (use_f16c); MX_INSTNORM_HALF_SCALAR=1 forces the portable path.
#if defined(MX_INSTNORM_F16C)
__attribute__((target("f16c,avx"), noinline)) void f16c_widen(const half_t* p, int64_t len,
                                                                  float* out) {
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
  for (; i < len; ++i) out[i] = _cvtsh_ss(p[i].bits);
}

__attribute__((target("f16c,avx"), noinline)) void f16c_narrow(const float* v, int64_t len,
                                                                   half_t* q) {
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < len; ++i) q[i].bits = _cvtss_sh(v[i], _MM_FROUND_TO_NEAREST_INT);
}
#else
void f16c_widen(const half_t*, int64_t, float*) {}
void f16c_narrow(const float*, int64_t, half_t*) {}
#endif

bool use_f16c() {
#if defined(MX_INSTNORM_F16C)
  static const bool cpu_has = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  const char* env = std::getenv("MX_INSTNORM_HALF_SCALAR");
  return cpu_has && !(env != nullptr && env[0] == '1');
#else
  return false;
#endif
}

template <class AccT, class T>
MX_INSTNORM_INLINE typename Vec<AccT>::type load(const T* p) {
  typename Vec<AccT>::type v;
  if constexpr (std::is_same<T, AccT>::value) {
    std::memcpy(&v, p, sizeof(v));
  } else if constexpr (std::is_same<T, half_t>::value && std::is_same<AccT, float>::value) {
    v = load_half16(p);
  } else if constexpr (std::is_same<T, bf16_t>::value && std::is_same<AccT, float>::value) {
    v = load_bf16x16(p);
  } else {
    for (int l = 0; l < Vec<AccT>::lanes; ++l) v[l] = widen(p[l]);
  }
  return v;
}

template <class V>
MX_INSTNORM_INLINE auto lane_total(const V& v) -> typename std::remove_reference<decltype(v[0])>::type {
  constexpr int n = sizeof(V) / sizeof(v[0]);
  typename std::remove_const<typename std::remove_reference<decltype(v[0])>::type>::type t[n];
  for (int l = 0; l < n; ++l) t[l] = v[l];
  for (int width = n / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) t[l] += t[l + width];
  return t[0];
}

// Chan's pairwise merge of (count, mean, m2) summaries, in double.
struct Moments {
  double count = 0, mean = 0, m2 = 0;
  void merge(double n, double mean_b, double m2_b) {
    if (n == 0) return;
    double total = count + n, delta = mean_b - mean;
    mean += delta * (n / total);
    m2 += m2_b + delta * delta * (count * n / total);
    count = total;
  }
};

// Two-pass mean and m2 of d = p - K over one contiguous chunk.
template <class T, class AccT>
MX_INSTNORM_INLINE void chunk_moments(const T* p, int64_t len, AccT K, AccT* mean_c, AccT* m2_c) {
  typedef typename Vec<AccT>::type V;
  constexpr int n = Vec<AccT>::lanes;
  V s = {};
  int64_t i = 0;
  for (; i + n <= len; i += n) s += load<AccT>(p + i) - K;
  AccT tail = 0;
  for (; i < len; ++i) tail += widen(p[i]) - K;
  const AccT m = (lane_total(s) + tail) / static_cast<AccT>(len);
  V q = {};
  for (i = 0; i + n <= len; i += n) {
    V e = (load<AccT>(p + i) - K) - m;
    q += e * e;
  }
  tail = 0;
  for (; i < len; ++i) {
    AccT e = (widen(p[i]) - K) - m;
    tail += e * e;
  }
  *mean_c = m;
  *m2_c = lane_total(q) + tail;
}

// The statistics of one instance as the kernel keeps them.
struct Stats {
  double K;      // the shift: the instance's first element
  double mu;     // mean(x - K)
  double rstd;
};

// Visits the elements of instance (n, c): A segments of B contiguous
// elements, segment stride C*B (B == 1: a column of stride C).
template <class T, class F>
void for_each_element(const T* x, const Layout& L, int64_t n, int64_t c, F f) {
  for (int64_t a = 0; a < L.a; ++a) {
    const T* p = x + ((n * L.a + a) * L.c + c) * L.b;
    for (int64_t j = 0; j < L.b; ++j) f(p[j]);
  }
}

// Slow path for instances whose float sums overflowed (or hold NaN/inf):
// double arithmetic, deviations scaled by the largest so squares cannot
// overflow. NaN or inf in the data still gives NaN, confined to this
// instance.
template <class T>
Stats scaled_stats(const T* x, const Layout& L, int64_t n, int64_t c, double K, double eps) {
  const double m = static_cast<double>(L.a * L.b);
  double sum = 0;
  for_each_element(x, L, n, c, [&](T v) { sum += static_cast<double>(widen(v)) - K; });
  double mu = sum / m, scale = 0;
  for_each_element(x, L, n, c, [&](T v) {
    scale = std::max(scale, std::fabs(static_cast<double>(widen(v)) - K - mu));
  });
  if (!(scale > 0) || !std::isfinite(scale) || !std::isfinite(mu)) {
    double bad = std::isfinite(mu) && scale == 0 ? 1.0 / std::sqrt(eps)
                                                 : std::numeric_limits<double>::quiet_NaN();
    return {K, mu, bad};
  }
  double q = 0;
  for_each_element(x, L, n, c, [&](T v) {
    double e = (static_cast<double>(widen(v)) - K - mu) / scale;
    q += e * e;
  });
  // var + eps = scale^2 * (q / m + eps / scale^2)
  return {K, mu, 1.0 / (scale * std::sqrt(q / m + eps / scale / scale))};
}

template <class T>
Stats finish_stats(const Moments& mo, const T* x, const Layout& L, int64_t n, int64_t c,
                   double K, double eps) {
  double var = mo.m2 / mo.count;
  if (!std::isfinite(var) || !std::isfinite(mo.mean)) return scaled_stats(x, L, n, c, K, eps);
  return {K, mo.mean, 1.0 / std::sqrt(var + eps)};
}

// ---------------------------------------------------------------- forward --

// Channels first and the general case: instances [first, last), each A
// segments of B contiguous elements.
template <class T, class P>
MX_INSTNORM_HOT void forward_segments(const Layout& L, const T* x, const P* gamma,
                                      const P* beta, double eps, T* y,
                                      typename Acc<T>::type* mean,
                                      typename Acc<T>::type* rstd, int64_t first,
                                      int64_t last, bool f16c) {
  typedef typename Acc<T>::type AccT;
  constexpr bool chunked = std::is_same<T, half_t>::value;  // when f16c
  alignas(64) AccT buf[chunked ? kChunk : 1];
  for (int64_t i = first; i < last; ++i) {
    const int64_t n = i / L.c, c = i % L.c;
    const T* x0 = x + (n * L.a * L.c + c) * L.b;
    const AccT K = widen(x0[0]);
    Moments mo;
    for (int64_t a = 0; a < L.a; ++a) {
      const T* p = x0 + a * L.c * L.b;
      for (int64_t off = 0; off < L.b; off += kChunk) {
        int64_t len = std::min(kChunk, L.b - off);
        AccT mc, m2c;
        if (chunked && f16c) {
          if constexpr (chunked) f16c_widen(p + off, len, buf);
          chunk_moments(buf, len, K, &mc, &m2c);
        } else {
          chunk_moments(p + off, len, K, &mc, &m2c);
        }
        mo.merge(static_cast<double>(len), mc, m2c);
      }
    }
    Stats st = finish_stats(mo, x, L, n, c, K, eps);
    if (mean != nullptr) mean[i] = static_cast<AccT>(st.K + st.mu);
    if (rstd != nullptr) rstd[i] = static_cast<AccT>(st.rstd);
    const AccT mu = static_cast<AccT>(st.mu);
    const AccT k = static_cast<AccT>(widen(gamma[c]) * static_cast<AccT>(st.rstd));
    const AccT b = static_cast<AccT>(widen(beta[c]));
    // One formula for vectors, scalars and F16C chunks alike.
    auto out = [&](auto v) __attribute__((always_inline)) { return ((v - K) - mu) * k + b; };
    for (int64_t a = 0; a < L.a; ++a) {
      const int64_t off = a * L.c * L.b;
      const T* p = x0 + off;
      T* q = y + (n * L.a * L.c + c) * L.b + off;
      if constexpr (chunked) {
        if (f16c) {
          for (int64_t j0 = 0; j0 < L.b; j0 += kChunk) {
            const int64_t len = std::min(kChunk, L.b - j0);
            f16c_widen(p + j0, len, buf);
            for (int64_t j = 0; j < len; ++j) buf[j] = out(buf[j]);
            f16c_narrow(buf, len, q + j0);
          }
          continue;
        }
      }
      int64_t j = 0;
      if constexpr (IsHalf<T>::value) {
        // Whole vectors (GCC left the fused widen-narrow loop scalar).
        for (; j + 16 <= L.b; j += 16) store(q + j, out(load<AccT>(p + j)));
      }
      for (; j < L.b; ++j) q[j] = narrow<T>(out(widen(p[j])));
    }
  }
}

// Channels last (B == 1): columns [c0, c1) of the (A, C) slab of batch n.
template <class T, class P>
MX_INSTNORM_HOT void forward_columns(const Layout& L, const T* x, const P* gamma,
                                     const P* beta, double eps, T* y,
                                     typename Acc<T>::type* mean,
                                     typename Acc<T>::type* rstd, int64_t n, int64_t c0,
                                     int64_t c1, bool f16c) {
  typedef typename Acc<T>::type AccT;
  const int64_t w = c1 - c0, C = L.c;
  constexpr bool chunked = std::is_same<T, half_t>::value;  // when f16c
  alignas(64) AccT rbuf[chunked ? kColBlock : 1];
  // body(row) on the row's w elements, converted with F16C first when
  // that is the path: the same float32 arithmetic either way.
  auto with_row = [&](const T* row, auto body) __attribute__((always_inline)) {
    if constexpr (chunked) {
      if (f16c) {
        f16c_widen(row, w, rbuf);
        return body(static_cast<const AccT*>(rbuf));
      }
    }
    return body(row);
  };
  const T* slab = x + n * L.a * C + c0;
  T* out = y + n * L.a * C + c0;
  AccT K[kColBlock], s[kColBlock], q[kColBlock], mu[kColBlock], k[kColBlock], b[kColBlock];
  Moments mo[kColBlock];
  for (int64_t j = 0; j < w; ++j) K[j] = widen(slab[j]);
  for (int64_t r0 = 0; r0 < L.a; r0 += kRowChunk) {
    const int64_t r1 = std::min(L.a, r0 + kRowChunk);
    for (int64_t j = 0; j < w; ++j) s[j] = q[j] = 0;
    for (int64_t r = r0; r < r1; ++r)
      with_row(slab + r * C, [&](auto row) __attribute__((always_inline)) {
        for (int64_t j = 0; j < w; ++j) s[j] += widen(row[j]) - K[j];
      });
    const AccT len = static_cast<AccT>(r1 - r0);
    for (int64_t j = 0; j < w; ++j) mu[j] = s[j] / len;
    for (int64_t r = r0; r < r1; ++r)
      with_row(slab + r * C, [&](auto row) __attribute__((always_inline)) {
        for (int64_t j = 0; j < w; ++j) {
          AccT e = (widen(row[j]) - K[j]) - mu[j];
          q[j] += e * e;
        }
      });
    for (int64_t j = 0; j < w; ++j) mo[j].merge(static_cast<double>(r1 - r0), mu[j], q[j]);
  }
  for (int64_t j = 0; j < w; ++j) {
    const int64_t c = c0 + j;
    Stats st = finish_stats(mo[j], x, L, n, c, K[j], eps);
    if (mean != nullptr) mean[n * C + c] = static_cast<AccT>(st.K + st.mu);
    if (rstd != nullptr) rstd[n * C + c] = static_cast<AccT>(st.rstd);
    mu[j] = static_cast<AccT>(st.mu);
    k[j] = static_cast<AccT>(widen(gamma[c]) * static_cast<AccT>(st.rstd));
    b[j] = static_cast<AccT>(widen(beta[c]));
  }
  for (int64_t r = 0; r < L.a; ++r) {
    T* orow = out + r * C;
    with_row(slab + r * C, [&](auto row) __attribute__((always_inline)) {
      if constexpr (chunked) {
        if (f16c) {  // row is rbuf: overwritten in place, then narrowed
          for (int64_t j = 0; j < w; ++j) rbuf[j] = ((rbuf[j] - K[j]) - mu[j]) * k[j] + b[j];
          f16c_narrow(rbuf, w, orow);
          return;
        }
      }
      for (int64_t j = 0; j < w; ++j)
        orow[j] = narrow<T>(((widen(row[j]) - K[j]) - mu[j]) * k[j] + b[j]);
    });
  }
}

// --------------------------------------------------------------- backward --

// The fused sums of one instance, with d = x - K (K its first element):
// sum(d), sum(d^2), sum(g), sum(g d).
struct GradSums {
  double d = 0, dd = 0, g = 0, gd = 0;
};

template <class T, class AccT>
MX_INSTNORM_INLINE void chunk_grad_sums(const T* g, const T* x, int64_t len, AccT K, GradSums* out) {
  typedef typename Vec<AccT>::type V;
  constexpr int n = Vec<AccT>::lanes;
  V s_d = {}, s_dd = {}, s_g = {}, s_gd = {};
  int64_t i = 0;
  for (; i + n <= len; i += n) {
    V gv = load<AccT>(g + i), d = load<AccT>(x + i) - K;
    s_d += d;
    s_dd += d * d;
    s_g += gv;
    s_gd += gv * d;
  }
  AccT t_d = 0, t_dd = 0, t_g = 0, t_gd = 0;
  for (; i < len; ++i) {
    AccT gv = widen(g[i]), d = widen(x[i]) - K;
    t_d += d;
    t_dd += d * d;
    t_g += gv;
    t_gd += gv * d;
  }
  out->d += lane_total(s_d) + t_d;
  out->dd += lane_total(s_dd) + t_dd;
  out->g += lane_total(s_g) + t_g;
  out->gd += lane_total(s_gd) + t_gd;
}

// The statistics from the fused sums: mu = E[d], var = E[d^2] - mu^2 and
// sum(g (x - mean)) = sum(g d) - mu sum(g), which keep their digits while
// K lies within 4 standard deviations of the mean (d is then as large as
// the spread, not the offset). Instances where it does not, or whose
// squares overflowed, are reduced again, exactly: the statistics as in the
// forward's slow path, and sum(g (d - mu)) in double (stored back into
// sums->gd so that the formula above gives it).
template <class T>
Stats backward_stats(GradSums* sums, const T* dy, const T* x, const Layout& L, int64_t n,
                     int64_t c, double K, double eps) {
  const double m = static_cast<double>(L.a * L.b);
  const double mu = sums->d / m, var = sums->dd / m - mu * mu;
  if (std::isfinite(var) && std::isfinite(mu) && mu * mu <= 16 * var)
    return {K, mu, 1.0 / std::sqrt(std::max(var, 0.0) + eps)};
  Stats st = scaled_stats(x, L, n, c, K, eps);
  double centered = 0;
  const int64_t offset = ((n * L.a) * L.c + c) * L.b;
  for (int64_t a = 0; a < L.a; ++a) {
    const int64_t base = offset + a * L.c * L.b;
    for (int64_t j = 0; j < L.b; ++j)
      centered += static_cast<double>(widen(dy[base + j])) *
                  (static_cast<double>(widen(x[base + j])) - K - st.mu);
  }
  sums->gd = centered + st.mu * sums->g;
  return st;
}

// dx written, or added to what it holds (MXNet's grad_req 'add'): `add`
// reaches the loops as a compile-time constant (std::true_type or
// std::false_type), so that the writing loops carry no branch.
template <class F>
MX_INSTNORM_INLINE void with_add(bool add, F&& f) {
  if (add)
    f(std::true_type{});
  else
    f(std::false_type{});
}

// One dx element: v, or v summed with what q holds, rounded once.
template <class Add, class T, class AccT>
MX_INSTNORM_INLINE void put(T* q, AccT v) {
  if constexpr (Add::value) v = widen(*q) + v;
  *q = narrow<T>(v);
}

// dx = k (g - c1 - xhat c2) = k (g - b1 d + b0), with d = x - K,
// b1 = rstd c2 and b0 = b1 mu - c1. k is kept apart: at |x| ~ 1e30, k and
// b1 are both ~1e-30 and their product would underflow float32.
struct DxCoef {
  double k, b0, b1;
  double dgamma, dbeta;  // this instance's sum(g xhat) and sum(g)
};

MX_INSTNORM_INLINE DxCoef backward_coefficients(double m, double gamma, const Stats& st,
                                                const GradSums& sums) {
  const double rstd = st.rstd;
  const double sum_g_centered = sums.gd - st.mu * sums.g;  // sum(g (x - mean))
  const double c1 = sums.g / m, c2 = rstd * sum_g_centered / m;
  DxCoef co;
  co.k = gamma * rstd;
  co.b1 = rstd * c2;
  co.b0 = co.b1 * st.mu - c1;
  co.dgamma = rstd * sum_g_centered;
  co.dbeta = sums.g;
  return co;
}

template <class T, class P>
MX_INSTNORM_HOT void backward_segments(const Layout& L, const T* dy, const T* x, const P* gamma,
                                       double eps, T* dx, bool add_dx, double* dgamma_part,
                                       double* dbeta_part, int64_t first, int64_t last,
                                       bool f16c) {
  typedef typename Acc<T>::type AccT;
  constexpr bool chunked = std::is_same<T, half_t>::value;  // when f16c
  alignas(64) AccT gbuf[chunked ? kChunk : 1], xbuf[chunked ? kChunk : 1];
  alignas(64) AccT qbuf[chunked ? kChunk : 1];
  const double m = static_cast<double>(L.a * L.b);
  for (int64_t i = first; i < last; ++i) {
    const int64_t n = i / L.c, c = i % L.c;
    const int64_t base = (n * L.a * L.c + c) * L.b, stride = L.c * L.b;
    const AccT K = widen(x[base]);
    GradSums sums;
    for (int64_t a = 0; a < L.a; ++a)
      for (int64_t off = 0; off < L.b; off += kChunk) {
        const T* g = dy + base + a * stride + off;
        const T* p = x + base + a * stride + off;
        const int64_t len = std::min(kChunk, L.b - off);
        if (chunked && f16c) {
          if constexpr (chunked) {
            f16c_widen(g, len, gbuf);
            f16c_widen(p, len, xbuf);
          }
          chunk_grad_sums(gbuf, xbuf, len, K, &sums);
        } else {
          chunk_grad_sums(g, p, len, K, &sums);
        }
      }
    const Stats st = backward_stats(&sums, dy, x, L, n, c, K, eps);
    const DxCoef co = backward_coefficients(m, widen(gamma[c]), st, sums);
    dgamma_part[i] = co.dgamma;
    dbeta_part[i] = co.dbeta;
    if (dx == nullptr) continue;
    const AccT k = static_cast<AccT>(co.k), b0 = static_cast<AccT>(co.b0), b1 = static_cast<AccT>(co.b1);
    // One formula for vectors, scalars and F16C chunks alike.
    auto out = [&](auto gv, auto xv) __attribute__((always_inline)) { return k * (gv - b1 * (xv - K) + b0); };
    auto write_dx = [&](auto add) __attribute__((always_inline)) {
      for (int64_t a = 0; a < L.a; ++a) {
        const int64_t off = base + a * stride;
        const T* g = dy + off;
        const T* p = x + off;
        T* q = dx + off;
        if constexpr (chunked) {
          if (f16c) {
            for (int64_t j0 = 0; j0 < L.b; j0 += kChunk) {
              const int64_t len = std::min(kChunk, L.b - j0);
              f16c_widen(g + j0, len, gbuf);
              f16c_widen(p + j0, len, xbuf);
              if constexpr (decltype(add)::value) {
                f16c_widen(q + j0, len, qbuf);
                for (int64_t j = 0; j < len; ++j) gbuf[j] = qbuf[j] + out(gbuf[j], xbuf[j]);
              } else {
                for (int64_t j = 0; j < len; ++j) gbuf[j] = out(gbuf[j], xbuf[j]);
              }
              f16c_narrow(gbuf, len, q + j0);
            }
            continue;
          }
        }
        int64_t j = 0;
        if constexpr (IsHalf<T>::value) {
          for (; j + 16 <= L.b; j += 16) {
            auto v = out(load<AccT>(g + j), load<AccT>(p + j));
            if constexpr (decltype(add)::value) v = load<AccT>(q + j) + v;
            store(q + j, v);
          }
        }
        for (; j < L.b; ++j) put<decltype(add)>(q + j, out(widen(g[j]), widen(p[j])));
      }
    };
    with_add(add_dx, write_dx);
  }
}

template <class T, class P>
MX_INSTNORM_HOT void backward_columns(const Layout& L, const T* dy, const T* x, const P* gamma,
                                      double eps, T* dx, bool add_dx, double* dgamma_part,
                                      double* dbeta_part, int64_t n, int64_t c0, int64_t c1,
                                      bool f16c) {
  typedef typename Acc<T>::type AccT;
  const int64_t w = c1 - c0, C = L.c;
  constexpr bool chunked = std::is_same<T, half_t>::value;  // when f16c
  alignas(64) AccT gbuf[chunked ? kColBlock : 1], xbuf[chunked ? kColBlock : 1];
  // body(g, x) on one row of dy and of x, as in forward_columns.
  auto with_rows = [&](const T* g, const T* p, auto body) __attribute__((always_inline)) {
    if constexpr (chunked) {
      if (f16c) {
        f16c_widen(g, w, gbuf);
        f16c_widen(p, w, xbuf);
        return body(static_cast<const AccT*>(gbuf), static_cast<const AccT*>(xbuf));
      }
    }
    return body(g, p);
  };
  const int64_t base = n * L.a * C + c0;
  AccT K[kColBlock], s_d[kColBlock], s_dd[kColBlock], s_g[kColBlock], s_gd[kColBlock];
  AccT k[kColBlock], b0[kColBlock], b1[kColBlock];
  GradSums sums[kColBlock];
  for (int64_t j = 0; j < w; ++j) K[j] = widen(x[base + j]);
  for (int64_t r0 = 0; r0 < L.a; r0 += kRowChunk) {
    const int64_t r1 = std::min(L.a, r0 + kRowChunk);
    for (int64_t j = 0; j < w; ++j) s_d[j] = s_dd[j] = s_g[j] = s_gd[j] = 0;
    for (int64_t r = r0; r < r1; ++r)
      with_rows(dy + base + r * C, x + base + r * C,
                [&](auto g, auto p) __attribute__((always_inline)) {
                  for (int64_t j = 0; j < w; ++j) {
                    AccT gv = widen(g[j]), d = widen(p[j]) - K[j];
                    s_d[j] += d;
                    s_dd[j] += d * d;
                    s_g[j] += gv;
                    s_gd[j] += gv * d;
                  }
                });
    for (int64_t j = 0; j < w; ++j) {
      sums[j].d += s_d[j];
      sums[j].dd += s_dd[j];
      sums[j].g += s_g[j];
      sums[j].gd += s_gd[j];
    }
  }
  const double m = static_cast<double>(L.a);
  for (int64_t j = 0; j < w; ++j) {
    const int64_t i = n * C + c0 + j;
    const Stats st = backward_stats(&sums[j], dy, x, L, n, c0 + j, K[j], eps);
    const DxCoef co = backward_coefficients(m, widen(gamma[c0 + j]), st, sums[j]);
    dgamma_part[i] = co.dgamma;
    dbeta_part[i] = co.dbeta;
    k[j] = static_cast<AccT>(co.k);
    b0[j] = static_cast<AccT>(co.b0);
    b1[j] = static_cast<AccT>(co.b1);
  }
  if (dx == nullptr) return;
  alignas(64) AccT qbuf[chunked ? kColBlock : 1];
  auto write_dx = [&](auto add) __attribute__((always_inline)) {
    for (int64_t r = 0; r < L.a; ++r) {
      T* q = dx + base + r * C;
      with_rows(dy + base + r * C, x + base + r * C,
                [&](auto g, auto p) __attribute__((always_inline)) {
                  if constexpr (chunked) {
                    if (f16c) {  // g is gbuf: overwritten in place, then narrowed
                      if constexpr (decltype(add)::value) f16c_widen(q, w, qbuf);
                      for (int64_t j = 0; j < w; ++j) {
                        AccT v = k[j] * (gbuf[j] - b1[j] * (xbuf[j] - K[j]) + b0[j]);
                        if constexpr (decltype(add)::value) v = qbuf[j] + v;
                        gbuf[j] = v;
                      }
                      f16c_narrow(gbuf, w, q);
                      return;
                    }
                  }
                  for (int64_t j = 0; j < w; ++j)
                    put<decltype(add)>(q + j, k[j] * (widen(g[j]) - b1[j] * (widen(p[j]) - K[j]) +
                                                     b0[j]));
                });
    }
  };
  with_add(add_dx, write_dx);
}

// ---------------------------------------------------------------- threads --

// Runs work(item) for item in [0, items) on up to `threads` threads (the
// caller's included), each taking the next item from an atomic counter, so
// a core busy with another process slows only the items it takes. The
// caller waits for the items, not for the threads: a helper thread that
// only gets a CPU after the caller has taken every item finds none left
// and exits on its own (it is detached and touches nothing but the shared
// counters), so a loaded machine never makes the call wait for a thread
// start. Measured with the other core busy: joining instead cost up to a
// scheduler time slice (4 ms) on a 64 KiB call.
struct WorkQueue {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::mutex mutex;
  std::condition_variable finished;
};

template <class F>
void parallel_for(int64_t items, int threads, F work) {
  if (threads <= 1 || items <= 1) {
    for (int64_t i = 0; i < items; ++i) work(i);
    return;
  }
  auto queue = std::make_shared<WorkQueue>();
  // Runs items until none is left; the last one to finish wakes the caller.
  auto drain = [items](WorkQueue& q, F& body) {
    int64_t finished = 0;
    for (int64_t i = q.next.fetch_add(1); i < items; i = q.next.fetch_add(1)) {
      body(i);
      ++finished;
    }
    if (finished > 0 && q.done.fetch_add(finished) + finished == items) {
      std::lock_guard<std::mutex> lock(q.mutex);
      q.finished.notify_all();
    }
  };
  for (int t = 1; t < threads; ++t) {
    try {
      // `work` is only called for an item below `items`, which the caller
      // is still waiting for, so the reference to it stays valid.
      std::thread([queue, drain, &work]() { drain(*queue, work); }).detach();
    } catch (const std::system_error&) {
      break;  // no more threads available: the ones we have do the work
    }
  }
  drain(*queue, work);
  std::unique_lock<std::mutex> lock(queue->mutex);
  queue->finished.wait(lock, [&]() { return queue->done.load() == items; });
}

int threads_for(int requested, int64_t items, size_t bytes) {
  if (bytes < kParallelMinBytes) return 1;
  int64_t by_size = static_cast<int64_t>(bytes / kBytesPerThread);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({requested, items, by_size})));
}

// A fresh output (MXNet's CPU storage has no pool) faults in page by page;
// on 2 MiB pages that is 512 times fewer faults. Measured (best of runs,
// load 4-5 on 2 cores), forward+backward of (1, 64, 256, 256) float32:
// 3.9-4.4 ms with the advice, 11.4 ms without; MADV_POPULATE_WRITE before
// the threads start did not help (13.0 ms with it, 17.0 ms with it alone).
void advise_fresh_output(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (p == nullptr || bytes < kHugePageMinBytes) return;
  const uintptr_t huge = 2u << 20;
  uintptr_t first = (reinterpret_cast<uintptr_t>(p) + huge - 1) & ~(huge - 1);
  uintptr_t last = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(huge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

template <class T, class P>
void run_forward(const Layout& L, const void* xv, const void* gv, const void* bv, double eps,
                 void* yv, void* meanv, void* rstdv, int num_threads) {
  typedef typename Acc<T>::type AccT;
  const T* x = static_cast<const T*>(xv);
  const P* gamma = static_cast<const P*>(gv);
  const P* beta = static_cast<const P*>(bv);
  T* y = static_cast<T*>(yv);
  AccT* mean = static_cast<AccT*>(meanv);
  AccT* rstd = static_cast<AccT*>(rstdv);
  const int64_t instances = L.n * L.c, m = L.a * L.b;
  if (instances == 0) return;
  if (m == 0) {
    if (mean != nullptr) std::fill(mean, mean + instances, std::numeric_limits<AccT>::quiet_NaN());
    if (rstd != nullptr) std::fill(rstd, rstd + instances, std::numeric_limits<AccT>::quiet_NaN());
    return;
  }
  const size_t bytes = static_cast<size_t>(instances * m) * sizeof(T);
  advise_fresh_output(y, bytes);
  const bool f16c = std::is_same<T, half_t>::value && use_f16c();
  if (L.b == 1 && L.a > 1) {
    const int64_t blocks = (L.c + kColBlock - 1) / kColBlock, items = L.n * blocks;
    parallel_for(items, threads_for(num_threads, items, bytes), [&](int64_t it) {
      const int64_t n = it / blocks, c0 = (it % blocks) * kColBlock;
      forward_columns<T, P>(L, x, gamma, beta, eps, y, mean, rstd, n, c0,
                            std::min(L.c, c0 + kColBlock), f16c);
    });
  } else {
    const int64_t group = std::max<int64_t>(1, kGroupBytes / (m * static_cast<int64_t>(sizeof(T))));
    const int64_t items = (instances + group - 1) / group;
    parallel_for(items, threads_for(num_threads, items, bytes), [&](int64_t it) {
      forward_segments<T, P>(L, x, gamma, beta, eps, y, mean, rstd, it * group,
                             std::min(instances, (it + 1) * group), f16c);
    });
  }
}

template <class T, class P>
void run_backward(const Layout& L, const void* dyv, const void* xv, const void* gv, double eps,
                  void* dxv, void* dgv, void* dbv, unsigned add_to, int num_threads) {
  const T* dy = static_cast<const T*>(dyv);
  const T* x = static_cast<const T*>(xv);
  const P* gamma = static_cast<const P*>(gv);
  T* dx = static_cast<T*>(dxv);
  P* dgamma = static_cast<P*>(dgv);
  P* dbeta = static_cast<P*>(dbv);
  const int64_t instances = L.n * L.c, m = L.a * L.b;
  std::vector<double> dgamma_part(static_cast<size_t>(instances), 0.0);
  std::vector<double> dbeta_part(static_cast<size_t>(instances), 0.0);
  if (instances > 0 && m > 0) {
    const size_t bytes = static_cast<size_t>(instances * m) * sizeof(T);
    const bool add_dx = (add_to & kAddDx) != 0;
    if (!add_dx) advise_fresh_output(dx, bytes);
    const bool f16c = std::is_same<T, half_t>::value && use_f16c();
    if (L.b == 1 && L.a > 1) {
      const int64_t blocks = (L.c + kColBlock - 1) / kColBlock, items = L.n * blocks;
      parallel_for(items, threads_for(num_threads, items, 2 * bytes), [&](int64_t it) {
        const int64_t n = it / blocks, c0 = (it % blocks) * kColBlock;
        backward_columns<T, P>(L, dy, x, gamma, eps, dx, add_dx, dgamma_part.data(),
                               dbeta_part.data(), n, c0, std::min(L.c, c0 + kColBlock), f16c);
      });
    } else {
      const int64_t group =
          std::max<int64_t>(1, kGroupBytes / (2 * m * static_cast<int64_t>(sizeof(T))));
      const int64_t items = (instances + group - 1) / group;
      parallel_for(items, threads_for(num_threads, items, 2 * bytes), [&](int64_t it) {
        backward_segments<T, P>(L, dy, x, gamma, eps, dx, add_dx, dgamma_part.data(),
                                dbeta_part.data(), it * group,
                                std::min(instances, (it + 1) * group), f16c);
      });
    }
  }
  // Per-channel sums over the batch, in batch order: deterministic.
  for (int64_t c = 0; c < L.c; ++c) {
    double g = 0, b = 0;
    for (int64_t n = 0; n < L.n; ++n) {
      g += dgamma_part[n * L.c + c];
      b += dbeta_part[n * L.c + c];
    }
    typedef typename Acc<P>::type AccP;
    if (dgamma != nullptr)
      dgamma[c] = narrow<P>((add_to & kAddDgamma) ? widen(dgamma[c]) + static_cast<AccP>(g)
                                                  : static_cast<AccP>(g));
    if (dbeta != nullptr)
      dbeta[c] = narrow<P>((add_to & kAddDbeta) ? widen(dbeta[c]) + static_cast<AccP>(b)
                                                : static_cast<AccP>(b));
  }
}

bool bad_dtypes(DType data, DType param, std::string* error) {
  bool ok = (data == kFloat16 && (param == kFloat16 || param == kFloat32)) ||
            (data == kBfloat16 && (param == kBfloat16 || param == kFloat32)) ||
            (data == kFloat32 && param == kFloat32) || (data == kFloat64 && param == kFloat64);
  if (!ok && error != nullptr) *error = "unsupported data/parameter dtype combination";
  return !ok;
}

}  // namespace

DType accumulation_dtype(DType data) { return data == kFloat64 ? kFloat64 : kFloat32; }

// MX_INSTNORM_NUM_THREADS if set (a bad value is an error); else the thread
// settings MXNet itself honours, in MXNet's precedence (src/engine/openmp.cc:
// MXNET_OMP_MAX_THREADS over OMP_NUM_THREADS), so that a server that gives
// each worker one thread (Multi Model Server sets OMP_NUM_THREADS=1) is
// obeyed; else the CPUs this process may run on. Those two are MXNet's and
// OpenMP's: a value that is not a positive integer is passed over, as
// OpenMP does, rather than failing our calls; OMP_NUM_THREADS may be a
// list ("4,2": nesting levels), whose first entry is the outer level.
// kernel/instance_norm.py's default_num_threads follows the same rules.
int num_threads_from_env(std::string* error) {
  auto trimmed = [](const char* env) {
    std::string text(env == nullptr ? "" : env);
    size_t b = text.find_first_not_of(" \t\n\r"), e = text.find_last_not_of(" \t\n\r");
    return b == std::string::npos ? std::string() : text.substr(b, e - b + 1);
  };
  auto positive = [](const std::string& text) -> int {  // 0: not a count
    if (text.empty()) return 0;
    char* end = nullptr;
    errno = 0;
    long value = std::strtol(text.c_str(), &end, 10);
    if (errno != 0 || *end != '\0' || value < 1 || value > 4096) return 0;
    return static_cast<int>(value);
  };
  std::string ours = trimmed(std::getenv("MX_INSTNORM_NUM_THREADS"));
  if (!ours.empty()) {
    int value = positive(ours);
    if (value == 0 && error != nullptr)
      *error = "MX_INSTNORM_NUM_THREADS must be a positive integer, got '" + ours + "'";
    return value;
  }
  if (int value = positive(trimmed(std::getenv("MXNET_OMP_MAX_THREADS")))) return value;
  std::string omp = trimmed(std::getenv("OMP_NUM_THREADS"));
  if (int value = positive(trimmed(omp.substr(0, omp.find(',')).c_str()))) return value;
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int>(hw) : 1;
}

// Calls f(Types<Data, Param>{}) for the (data, param) dtype pair.
template <typename D, typename P>
struct Types {
  using Data = D;
  using Param = P;
};

template <typename F>
void with_types(DType data, DType param, F&& f) {
  if (data == kFloat16 && param == kFloat16)
    f(Types<half_t, half_t>{});
  else if (data == kFloat16)
    f(Types<half_t, float>{});
  else if (data == kBfloat16 && param == kBfloat16)
    f(Types<bf16_t, bf16_t>{});
  else if (data == kBfloat16)
    f(Types<bf16_t, float>{});
  else if (data == kFloat32)
    f(Types<float, float>{});
  else
    f(Types<double, double>{});
}

bool forward(const Layout& lay, DType data, DType param, const void* x, const void* gamma,
             const void* beta, double eps, void* y, void* mean, void* rstd, int num_threads,
             std::string* error) {
  if (bad_dtypes(data, param, error)) return false;
  with_types(data, param, [&](auto t) {
    using T = decltype(t);
    run_forward<typename T::Data, typename T::Param>(lay, x, gamma, beta, eps, y, mean, rstd,
                                                     num_threads);
  });
  return true;
}

bool backward(const Layout& lay, DType data, DType param, const void* dy, const void* x,
              const void* gamma, double eps, void* dx, void* dgamma, void* dbeta,
              unsigned add_to, int num_threads, std::string* error) {
  if (bad_dtypes(data, param, error)) return false;
  with_types(data, param, [&](auto t) {
    using T = decltype(t);
    run_backward<typename T::Data, typename T::Param>(lay, dy, x, gamma, eps, dx, dgamma,
                                                      dbeta, add_to, num_threads);
  });
  return true;
}

}  // namespace mx_instnorm
