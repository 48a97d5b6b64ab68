// Instance normalization CPU kernel: raw pointers, sizes and dtypes only.
//
// The maths, its derivation and the symbol names (mean/mu, rstd, d, k, c1,
// c2, the (N, A, C, B) view) are written once, in the module docstring of
// mx_instnorm/kernel/instance_norm.py; this kernel computes the same
// quantities. It knows nothing about MXNet.
#ifndef MX_INSTNORM_KERNEL_INSTANCE_NORM_H_
#define MX_INSTNORM_KERNEL_INSTANCE_NORM_H_

#include <cstdint>
#include <string>

namespace mx_instnorm {

// Element types the kernel handles.
enum DType : int { kFloat16 = 0, kFloat32 = 1, kFloat64 = 2, kBfloat16 = 3 };

// Data of rank >= 3 viewed, without copying, as (N, A, C, B): instance
// (n, c) is x[n, :, c, :], of M = A * B elements.
struct Layout {
  int64_t n, a, c, b;
};

// The accumulation dtype of data of dtype `data`: float32 for float16 and
// bfloat16 (float16 sums overflow at 65504 and keep 11 bits, bfloat16 sums
// keep 8), else the data's own.
DType accumulation_dtype(DType data);

// Threads for one call: MX_INSTNORM_NUM_THREADS if set (read on every
// call), else the CPUs in this process's affinity mask. Returns 0 and sets
// `error` when the variable is not a positive integer.
int num_threads_from_env(std::string* error);

// Forward: y = (x - mean) * rstd * gamma + beta per instance.
//   x, y:        N*A*C*B elements of dtype `data`, C-contiguous.
//   gamma, beta: C elements of dtype `param` (== data, or float32 with
//                float16 or bfloat16 data).
//   mean, rstd:  N*C elements of accumulation_dtype(data), written when
//                not null; NaN for empty instances (M == 0).
// Returns false (and sets `error`) for an unsupported dtype combination.
bool forward(const Layout& lay, DType data, DType param, const void* x,
             const void* gamma, const void* beta, double eps, void* y, void* mean,
             void* rstd, int num_threads, std::string* error);

// Which gradients backward adds to what their buffers hold (MXNet's
// grad_req 'add') instead of overwriting: a bitwise or, 0 for none.
enum AddTo : unsigned { kAddDx = 1, kAddDgamma = 2, kAddDbeta = 4 };

// Backward from dy, x and gamma alone (y and beta are not needed): the
// statistics are recomputed in the same pass that sums dy, at no extra
// memory traffic. Any of dx, dgamma, dbeta may be null: that gradient is
// not written. dgamma and dbeta have dtype `param`. A gradient named in
// `add_to` is summed into its buffer (old + new in the accumulation dtype,
// rounded once). Results are bitwise identical for every num_threads.
bool backward(const Layout& lay, DType data, DType param, const void* dy,
              const void* x, const void* gamma, double eps, void* dx, void* dgamma,
              void* dbeta, unsigned add_to, int num_threads, std::string* error);

}  // namespace mx_instnorm

#endif  // MX_INSTNORM_KERNEL_INSTANCE_NORM_H_
