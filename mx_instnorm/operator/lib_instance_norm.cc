// The compiled InstanceNorm operator for mx.library.load: a thin lib_api
// glue around the kernel in mx_instnorm/kernel/instance_norm.cc, laid out
// as MXNet's example/extensions/lib_custom_op (parseAttrs, inferType,
// inferShape, forward, backward, one REGISTER_OP chain at the bottom).
//
// Registered as mx_instnorm_InstanceNorm, attributes eps (default 0.001)
// and axis (default 1).
//   forward:  inputs (data, gamma, beta) -> output y.
//   backward: MXNet's dispatcher passes the output gradient, then the
//             inputs, then the output: (dy, data, gamma, beta, y) ->
//             (ddata, dgamma, dbeta). Only dy, data and gamma are read.
//             MXNet 1.9.1 passes no req: every gradient is written, never
//             added; a gradient nobody asked for may come without memory.
// The statistics are not outputs: the library API has no hidden outputs,
// so mean and rstd would be visible ones (a list from mx.nd, three outputs
// in every graph, out= taking three arrays), and each call would pay for
// their two arrays and, in backward, their two zero head gradients:
// measured on a (2, 1, 2) call, 26.4 vs 20.3 us forward and 95.8 vs 75.5
// us forward+backward (MXNet's built-in: 24.8 and 81). Backward gets them
// back from the pass over (dy, x) it makes anyway (see the kernel).
//
// Errors. A failure reports its message through lib_api's public
// MX_ERROR_MSG (class Failure below) and returns MX_FAIL. lib_api keeps
// every message it was given for the life of the process and MXNet shows
// them all, oldest first, under "Extension Traceback"; the current one is
// the last. mx_instnorm's Python side shows only that one
// (operator/_errors.py, library_message). These messages reach users of
// the raw mx.nd/mx.sym function and of graphs; mx_instnorm.nd.InstanceNorm
// tries the library first and re-validates in Python when it refuses.
//
// Symbols. The library is built with -fvisibility=hidden and a version
// script (setup.py): only lib_api's C entry points are exported.
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "lib_api.h"
#include "../kernel/instance_norm.h"

using mxnet::ext::MXReturnValue;
using mxnet::ext::MXTensor;
using mxnet::ext::OpResource;
using mxnet::ext::MX_FAIL;
using mxnet::ext::MX_SUCCESS;

namespace {

typedef std::unordered_map<std::string, std::string> Attrs;

const char kOp[] = "mx_instnorm_InstanceNorm";

// lib_api's list of messages only grows, and for each error MXNet copies
// every message in it (lib_api's _msgGet returns a new string that nobody
// frees): N failures that each added a message cost O(N^2) time and
// memory (measured: 2000 calls with a bad gamma through
// mx_instnorm.nd.InstanceNorm, 59 ms per call and 1.8 GiB at the end). So
// a message equal to the last one in the list is not added again: the
// list's last entry is already the current message. The lock keeps our
// own threads from adding to lib_api's vector at the same time (MXNet
// reads it without one; nothing here can change that).
std::mutex report_mutex;
std::string last_report;
int last_report_count = 0;  // lib_api's message count after our last add

void report(const std::string& message) {
  std::lock_guard<std::mutex> lock(report_mutex);
  mxnet::ext::MXerrorMsgs* list = mxnet::ext::MXerrorMsgs::get();
  if (list->size() == last_report_count && message == last_report) return;
  MX_ERROR_MSG << message;
  last_report = message;
  last_report_count = list->size();
}

// One failure's message, streamed like MX_ERROR_MSG and reported when the
// statement ends: Failure() << "..." << value;
class Failure {
 public:
  Failure() = default;
  Failure(const Failure&) = delete;
  Failure& operator=(const Failure&) = delete;
  ~Failure() { report(text_.str()); }
  template <typename T>
  Failure& operator<<(const T& value) {
    text_ << value;
    return *this;
  }

 private:
  std::ostringstream text_;
};

// ------------------------------------------------------------- dtypes --

// Every MXNet dtype code this operator may meet, its name for messages and
// the kernel's dtype where it computes it. Adding a dtype the kernel has
// learnt is one line here.
struct DTypeInfo {
  int code;
  const char* name;
  bool computed;
  mx_instnorm::DType kernel;
};

const DTypeInfo kDTypes[] = {
    {mxnet::ext::kFloat16, "float16", true, mx_instnorm::kFloat16},
    {12, "bfloat16", true, mx_instnorm::kBfloat16},  // mshadow's kBfloat16; not in lib_api's enum
    {mxnet::ext::kFloat32, "float32", true, mx_instnorm::kFloat32},
    {mxnet::ext::kFloat64, "float64", true, mx_instnorm::kFloat64},
    {mxnet::ext::kUint8, "uint8", false, mx_instnorm::kFloat32},
    {mxnet::ext::kInt32, "int32", false, mx_instnorm::kFloat32},
    {mxnet::ext::kInt8, "int8", false, mx_instnorm::kFloat32},
    {mxnet::ext::kInt64, "int64", false, mx_instnorm::kFloat32},
    {7, "bool", false, mx_instnorm::kFloat32},  // mshadow's kBool; not in lib_api's enum
};

const DTypeInfo* dtype_info(int code) {
  for (const DTypeInfo& d : kDTypes)
    if (d.code == code) return &d;
  return nullptr;
}

std::string dtype_name(int code) {
  const DTypeInfo* d = dtype_info(code);
  return d != nullptr ? d->name : "dtype code " + std::to_string(code);
}

size_t element_bytes(mx_instnorm::DType t) {
  return t == mx_instnorm::kFloat64 ? 8 : t == mx_instnorm::kFloat32 ? 4 : 2;
}

// The kernel's dtype for an MXNet dtype code, or false for a dtype the
// kernel does not compute (known to MXNet or not).
bool kernel_dtype(int code, mx_instnorm::DType* out) {
  const DTypeInfo* d = dtype_info(code);
  if (d == nullptr || !d->computed) return false;
  *out = d->kernel;
  return true;
}

// Data computed in a wider type (float16, bfloat16): gamma/beta default to
// that type (float32) where type inference does not know them.
bool is_half(int code) {
  mx_instnorm::DType k;
  return kernel_dtype(code, &k) && mx_instnorm::accumulation_dtype(k) != k;
}

// The kernel dtypes of (data, gamma, beta): gamma and beta share one, the
// data's or, for data accumulated in a wider type (float16), that type.
// The messages say what mx_instnorm's Python functions say.
bool kernel_dtypes(int data, int gamma, int beta, mx_instnorm::DType* kdata,
                   mx_instnorm::DType* kparam) {
  if (!kernel_dtype(data, kdata)) {
    std::string names;
    int count = 0, seen = 0;
    for (const DTypeInfo& k : kDTypes) count += k.computed;
    for (const DTypeInfo& k : kDTypes) {
      if (!k.computed) continue;
      names += std::string(seen == 0 ? "" : seen == count - 1 ? " or " : ", ") + k.name;
      ++seen;
    }
    Failure() << kOp << ": InstanceNorm data must be " << names << ", got "
                 << dtype_name(data);
    return false;
  }
  if (gamma != beta) {
    Failure() << kOp << ": gamma and beta must have the same dtype, got gamma "
                 << dtype_name(gamma) << " and beta " << dtype_name(beta);
    return false;
  }
  const mx_instnorm::DType wide = mx_instnorm::accumulation_dtype(*kdata);
  if (!kernel_dtype(gamma, kparam) || (*kparam != *kdata && *kparam != wide)) {
    std::string allowed = dtype_name(data);
    for (const DTypeInfo& k : kDTypes)
      if (k.computed && k.kernel == wide && k.kernel != *kdata) allowed += std::string(", ") + k.name;
    Failure() << kOp << ": gamma/beta dtype " << dtype_name(gamma)
                 << " does not match data dtype " << dtype_name(data) << " (allowed: " << allowed
                 << ")";
    return false;
  }
  return true;
}

// --------------------------------------------------------- attributes --

// Where backward puts one gradient. Set per call by the internal attribute
// kGradsKey, which only mx_instnorm.nd sets, while autograd records
// (operator/functions.py, _gradient_destinations), because MXNet 1.9.1
// passes a library operator no req: write (the default), skip (nobody
// asked for it: the data had no gradient buffer and no history, or a leaf
// marked 'null'), or add when the buffer MXNet hands over lies inside
// [lo, hi), the memory of the leaf's own gradient, marked 'add' (else,
// when several ops share the leaf, MXNet hands over a fresh buffer to sum
// later, to be written).
struct GradDest {
  enum Kind { kWrite, kSkip, kAddIfIn } kind = kWrite;
  uintptr_t lo = 0, hi = 0;
};

constexpr const char* kGradsKey = "__mx_instnorm_grads__";

// The operator's attributes, parsed from MXNet's strings by parse_params,
// the only code that reads them.
struct Params {
  double eps = 1e-3;
  int axis = 1;
  GradDest grads[3];  // data, gamma, beta
};

// kGradsKey's value: three comma-separated entries, "w", "-" or
// "+<lo>:<hi>" (decimal addresses).
bool parse_grads(const std::string& text, GradDest* grads) {
  std::istringstream in(text);
  std::string item;
  int i = 0;
  for (; i < 3 && std::getline(in, item, ','); ++i) {
    GradDest& d = grads[i];
    unsigned long long lo = 0, hi = 0;
    char colon = 0, rest = 0;
    if (item == "w") {
      d.kind = GradDest::kWrite;
    } else if (item == "-") {
      d.kind = GradDest::kSkip;
    } else if (item.size() > 1 && item[0] == '+' &&
               std::sscanf(item.c_str() + 1, "%llu%c%llu%c", &lo, &colon, &hi, &rest) == 3 &&
               colon == ':' && lo < hi) {
      d.kind = GradDest::kAddIfIn;
      d.lo = static_cast<uintptr_t>(lo);
      d.hi = static_cast<uintptr_t>(hi);
    } else {
      break;
    }
  }
  if (i != 3 || in.peek() != std::char_traits<char>::eof()) {
    Failure() << kOp << ": " << kGradsKey << " is mx_instnorm's own; got '" << text << "'";
    return false;
  }
  return true;
}

bool parse_params(const Attrs& attrs, Params* p) {
  for (const auto& kv : attrs) {
    const std::string& key = kv.first;
    const char* text = kv.second.c_str();
    char* end = nullptr;
    errno = 0;
    if (key == "eps") {
      // strtod also reads hexadecimal floats, which Python's float() refuses.
      p->eps = kv.second.find_first_of("xX") == std::string::npos ? std::strtod(text, &end)
                                                                  : NAN;
      if (end == text || (end != nullptr && *end != '\0') || !std::isfinite(p->eps) ||
          p->eps < 0) {
        Failure() << kOp << ": eps must be a finite number >= 0, got '" << kv.second << "'";
        return false;
      }
    } else if (key == "axis") {
      long value = std::strtol(text, &end, 10);
      if (end == text || *end != '\0' || errno != 0 || value > 1000000 || value < -1000000) {
        Failure() << kOp << ": axis must be an integer, got '" << kv.second << "'";
        return false;
      }
      p->axis = static_cast<int>(value);
    } else if (key == kGradsKey) {
      if (!parse_grads(kv.second, p->grads)) return false;
    } else if (!(key.size() >= 4 && key.compare(0, 2, "__") == 0 &&
                 key.compare(key.size() - 2, 2, "__") == 0)) {
      // MXNet adds attributes of its own (__ctx_group__, __lr_mult__...),
      // which are not ours to judge; anything else is a mistake.
      Failure() << kOp << ": unknown keyword " << key << "='" << kv.second
                   << "'; accepted keywords: eps, axis";
      return false;
    }
  }
  return true;
}

// -------------------------------------------------------------- shapes --

std::string shape_text(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << (shape.size() == 1 ? ",)" : ")");
  return os.str();
}

// (N, A, C, B) of data of shape `shape` with channel axis `axis`.
bool layout_of(const std::vector<int64_t>& shape, int axis, mx_instnorm::Layout* lay) {
  const int ndim = static_cast<int>(shape.size());
  const int ax = axis < 0 ? axis + ndim : axis;
  if (ndim < 3) {
    Failure() << kOp << ": InstanceNorm needs data of rank >= 3 (batch, channel, "
                 << "spatial...), got rank " << ndim << ", shape " << shape_text(shape);
    return false;
  }
  if (ax < 0 || ax >= ndim) {
    Failure() << kOp << ": axis " << axis << " is out of range for data of rank " << ndim
                 << " (valid: " << 1 - ndim << ".." << ndim - 1 << ", not 0)";
    return false;
  }
  if (ax == 0) {
    Failure() << kOp << ": axis " << axis << " is the batch axis; InstanceNorm normalizes "
                 << "each batch item separately, pick a channel axis in 1.." << ndim - 1;
    return false;
  }
  lay->n = shape[0];
  lay->a = 1;
  for (int i = 1; i < ax; ++i) lay->a *= shape[i];
  lay->c = shape[ax];
  lay->b = 1;
  for (int i = ax + 1; i < ndim; ++i) lay->b *= shape[i];
  return true;
}

bool check_shape(const char* name, const std::vector<int64_t>& shape,
                 const std::vector<int64_t>& want) {
  if (shape == want) return true;
  Failure() << kOp << ": " << name << " must have shape " << shape_text(want) << ", got "
               << shape_text(shape);
  return false;
}

bool check_param_shape(const char* name, const std::vector<int64_t>& shape, int64_t channels) {
  if (shape.size() == 1 && shape[0] == channels) return true;
  Failure() << kOp << ": " << name << " must have shape (" << channels << ",) to match the "
               << channels << " channels of data, got shape " << shape_text(shape);
  return false;
}

// ---------------------------------------------------- forward/backward --

// What forward and backward both need, checked once: the parameters, the
// layout and kernel dtypes of (data, gamma), the thread count.
struct Call {
  Params params;
  mx_instnorm::Layout lay;
  mx_instnorm::DType data, param;
  int threads;
};

// The common preamble. `x`, `gamma`, `beta` are the inputs at those
// indices; every tensor in `inputs` and `outputs` must be on the CPU.
bool prepare(const Attrs& attrs, const char* pass, const std::vector<MXTensor>& inputs,
             size_t num_inputs, const std::vector<MXTensor>& outputs, size_t num_outputs,
             size_t x, size_t gamma, size_t beta, Call* call) {
  if (inputs.size() != num_inputs || outputs.size() != num_outputs) {
    Failure() << kOp << " " << pass << " takes " << num_inputs << " inputs and "
                 << num_outputs << " outputs, got " << inputs.size() << " and "
                 << outputs.size();
    return false;
  }
  for (const std::vector<MXTensor>* list : {&inputs, &outputs}) {
    for (const MXTensor& t : *list) {
      if (t.ctx.dev_type != "cpu") {
        Failure() << kOp << " runs on CPU only, got a " << t.ctx.dev_type << " array";
        return false;
      }
    }
  }
  if (!parse_params(attrs, &call->params) ||
      !layout_of(inputs[x].shape, call->params.axis, &call->lay))
    return false;
  if (!check_param_shape("gamma", inputs[gamma].shape, call->lay.c) ||
      !check_param_shape("beta", inputs[beta].shape, call->lay.c) ||
      !kernel_dtypes(inputs[x].dtype, inputs[gamma].dtype, inputs[beta].dtype, &call->data,
                     &call->param))
    return false;
  std::string error;
  call->threads = mx_instnorm::num_threads_from_env(&error);
  if (call->threads == 0) {
    Failure() << kOp << ": " << error;
    return false;
  }
  return true;
}

// --------------------------------------------------------- lib_api glue --

MXReturnValue parseAttrs(const Attrs& attrs, int* num_in, int* num_out) {
  Params params;
  if (!parse_params(attrs, &params)) return MX_FAIL;
  *num_in = 3;
  *num_out = 1;
  return MX_SUCCESS;
}

MXReturnValue inferType(const Attrs&, std::vector<int>* in, std::vector<int>* out) {
  int& data = (*in)[0];
  int& gamma = (*in)[1];
  int& beta = (*in)[2];
  // A known dtype fills the others: gamma/beta from data (float16 or
  // bfloat16 data: float32, the parameters' precision under AMP, unless
  // one of them is given as the data's dtype), data from the parameters
  // (float32 parameters say nothing about half data, hence only when they
  // are the only thing known).
  if (data == -1 && gamma != -1) data = gamma;
  if (data == -1 && beta != -1) data = beta;
  if (data == -1) return MX_SUCCESS;  // nothing known yet
  if (gamma == -1) gamma = beta != -1 ? beta : is_half(data) ? int{mxnet::ext::kFloat32} : data;
  if (beta == -1) beta = gamma;
  mx_instnorm::DType kdata, kparam;
  if (!kernel_dtypes(data, gamma, beta, &kdata, &kparam)) return MX_FAIL;
  (*out)[0] = data;
  return MX_SUCCESS;
}

MXReturnValue inferShape(const Attrs& attrs, std::vector<std::vector<unsigned int>>* in,
                         std::vector<std::vector<unsigned int>>* out) {
  Params params;
  if (!parse_params(attrs, &params)) return MX_FAIL;
  const std::vector<unsigned int>& data = (*in)[0];
  // MXNet hands over an unknown shape as an empty one and an unknown size
  // as -1 cast to unsigned (under its legacy shape rules a 0 means that
  // too). An output carries known sizes only: the data's must all be known.
  std::vector<int64_t> shape;
  bool known = !data.empty();
  for (unsigned int d : data) {
    known = known && d != 0xFFFFFFFFu;
    shape.push_back(d == 0xFFFFFFFFu ? -1 : static_cast<int64_t>(d));
  }
  if (!known) {
    Failure() << kOp << " infers shapes from the data shape only, and it is not fully known: "
                 << (data.empty() ? std::string("unknown") : shape_text(shape));
    return MX_FAIL;
  }
  mx_instnorm::Layout lay;
  if (!layout_of(shape, params.axis, &lay)) return MX_FAIL;
  const char* names[2] = {"gamma", "beta"};
  for (int i = 1; i <= 2; ++i) {
    std::vector<unsigned int>& p = (*in)[i];
    // Not known yet: no shape, or rank 1 with an unknown size (Gluon's
    // deferred parameters, the variables mx_instnorm's functions declare).
    if (p.empty() || (p.size() == 1 && (p[0] == 0u || p[0] == 0xFFFFFFFFu))) {
      p.assign(1, static_cast<unsigned int>(lay.c));
    } else if (!check_param_shape(names[i - 1], std::vector<int64_t>(p.begin(), p.end()),
                                  lay.c)) {
      return MX_FAIL;
    }
  }
  (*out)[0] = data;
  return MX_SUCCESS;
}

MXReturnValue forward(const Attrs& attrs, std::vector<MXTensor>* inputs,
                      std::vector<MXTensor>* outputs, const OpResource&) {
  Call call;
  if (!prepare(attrs, "forward", *inputs, 3, *outputs, 1, 0, 1, 2, &call)) return MX_FAIL;
  const MXTensor& x = (*inputs)[0];
  MXTensor& y = (*outputs)[0];
  if (!check_shape("the output", y.shape, x.shape)) return MX_FAIL;
  if (y.dtype != x.dtype) {
    Failure() << kOp << ": the output must have the data's dtype " << dtype_name(x.dtype)
                 << ", got " << dtype_name(y.dtype);
    return MX_FAIL;
  }
  std::string error;
  if (!mx_instnorm::forward(call.lay, call.data, call.param, x.data_ptr, (*inputs)[1].data_ptr,
                            (*inputs)[2].data_ptr, call.params.eps, y.data_ptr, nullptr,
                            nullptr, call.threads, &error)) {
    Failure() << kOp << ": " << error;
    return MX_FAIL;
  }
  return MX_SUCCESS;
}

MXReturnValue backward(const Attrs& attrs, std::vector<MXTensor>* inputs,
                       std::vector<MXTensor>* outputs, const OpResource&) {
  // (dy, data, gamma, beta, y) -> (ddata, dgamma, dbeta).
  Call call;
  if (!prepare(attrs, "backward", *inputs, 5, *outputs, 3, 1, 2, 3, &call)) return MX_FAIL;
  const MXTensor& dy = (*inputs)[0];
  const MXTensor& x = (*inputs)[1];
  const MXTensor& gamma = (*inputs)[2];
  if (!check_shape("the output gradient", dy.shape, x.shape)) return MX_FAIL;
  if (dy.dtype != x.dtype) {
    Failure() << kOp << ": the output gradient must have the data's dtype "
                 << dtype_name(x.dtype) << ", got " << dtype_name(dy.dtype);
    return MX_FAIL;
  }
  // A gradient nobody asked for may come without memory (then it is not
  // written); one with memory must be the input's shape and dtype.
  const char* names[3] = {"the data gradient", "the gamma gradient", "the beta gradient"};
  const MXTensor* like[3] = {&x, &gamma, &gamma};
  void* targets[3];
  for (int i = 0; i < 3; ++i) {
    MXTensor& g = (*outputs)[i];
    targets[i] = g.data_ptr;
    if (g.data_ptr == nullptr) continue;
    if (!check_shape(names[i], g.shape, like[i]->shape)) return MX_FAIL;
    if (g.dtype != like[i]->dtype) {
      Failure() << kOp << ": " << names[i] << " must have dtype "
                   << dtype_name(like[i]->dtype) << ", got " << dtype_name(g.dtype);
      return MX_FAIL;
    }
  }
  unsigned add_to = 0;
  const unsigned add_bits[3] = {mx_instnorm::kAddDx, mx_instnorm::kAddDgamma,
                                mx_instnorm::kAddDbeta};
  for (int i = 0; i < 3; ++i) {
    const GradDest& d = call.params.grads[i];
    const MXTensor& g = (*outputs)[i];
    const uintptr_t p = reinterpret_cast<uintptr_t>(targets[i]);
    if (d.kind == GradDest::kSkip)
      targets[i] = nullptr;
    else if (d.kind == GradDest::kAddIfIn && p != 0 && p >= d.lo &&
             p + static_cast<uintptr_t>(g.size()) * element_bytes(i == 0 ? call.data : call.param) <=
                 d.hi)
      add_to |= add_bits[i];
  }
  std::string error;
  if (!mx_instnorm::backward(call.lay, call.data, call.param, dy.data_ptr, x.data_ptr,
                             gamma.data_ptr, call.params.eps, targets[0], targets[1],
                             targets[2], add_to, call.threads, &error)) {
    Failure() << kOp << ": " << error;
    return MX_FAIL;
  }
  return MX_SUCCESS;
}

}  // namespace

REGISTER_OP(mx_instnorm_InstanceNorm)
    .setParseAttrs(parseAttrs)
    .setInferType(inferType)
    .setInferShape(inferShape)
    .setForward(forward, "cpu")
    .setBackward(backward, "cpu");

// Declared by lib_api.h; exported (the rest of our code is hidden).
__attribute__((visibility("default"))) MXReturnValue initialize(int version) {
  // The library API with this MX_LIBRARY_VERSION is MXNet 1.9's; MXNet
  // itself refuses a library whose version constant differs.
  if (version >= 10700 && version < 20000) return MX_SUCCESS;
  Failure() << kOp << " does not support MXNet version " << version;
  return MX_FAIL;
}

// The thread count the kernel would use now (MX_INSTNORM_NUM_THREADS, then
// MXNet's MXNET_OMP_MAX_THREADS and OMP_NUM_THREADS, then the CPUs), 0 for
// an invalid MX_INSTNORM_NUM_THREADS: for diagnostics and the tests, which
// read it through ctypes. Exported with the entry points above.
extern "C" __attribute__((visibility("default"))) int mx_instnorm_num_threads() {
  return mx_instnorm::num_threads_from_env(nullptr);
}
