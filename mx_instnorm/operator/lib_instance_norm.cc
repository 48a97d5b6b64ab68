// The compiled InstanceNorm operator for mx.library.load: a thin lib_api
// glue around the kernel in mx_instnorm/kernel/instance_norm.cc.
//
// Registered as mx_instnorm_InstanceNorm, attributes eps (default 0.001)
// and axis (default 1), parsed strictly with the messages of
// mx_instnorm/operator/_params.py.
//   forward:  inputs (data, gamma, beta) -> output y.
//   backward: MXNet's dispatcher passes the output gradient, then the
//             inputs, then the output: (dy, data, gamma, beta, y) ->
//             (ddata, dgamma, dbeta). Only dy, data and gamma are read.
//             MXNet 1.9.1 passes no req: every gradient is written, never
//             added; a gradient nobody asked for still gets memory.
// The statistics are not outputs: the library API has no hidden outputs,
// so mean and rstd would be visible ones (a list from mx.nd, three outputs
// in every graph, out= taking three arrays), and each call would pay for
// their two arrays and, in backward, their two zero head gradients:
// measured on a (2, 1, 2) call, 26.4 vs 20.3 us forward and 95.8 vs 75.5
// us forward+backward (MXNet's built-in: 24.8 and 81). Backward gets them
// back from the pass over (dy, x) it makes anyway (see the kernel).
#include <cerrno>
#include <cmath>
#include <map>
#include <mutex>
#include <cstdlib>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "lib_api.h"
#include "../kernel/instance_norm.h"

using mxnet::ext::CustomOp;
using mxnet::ext::MXReturnValue;
using mxnet::ext::MXTensor;
using mxnet::ext::OpResource;
using mxnet::ext::MX_FAIL;
using mxnet::ext::MX_SUCCESS;

namespace {

typedef std::unordered_map<std::string, std::string> Attrs;

// lib_api's message list (MX_ERROR_MSG) only ever grows, and MXNet shows
// every message in it with each error: without this, the first bad call's
// message would head every later error. The class's one member is this
// vector (private), so it is emptied through a mirror of its layout.
struct ErrorList {
  std::vector<std::stringstream*> messages;
};
static_assert(sizeof(ErrorList) == sizeof(mxnet::ext::MXerrorMsgs),
              "lib_api's MXerrorMsgs layout changed");
std::mutex error_mutex;

// Starts a fresh error message (the only one MXNet will show).
std::stringstream& fail_message() {
  std::lock_guard<std::mutex> lock(error_mutex);
  ErrorList* list = reinterpret_cast<ErrorList*>(mxnet::ext::MXerrorMsgs::get());
  for (std::stringstream* m : list->messages) delete m;
  list->messages.clear();
  return MX_ERROR_MSG;
}

// Python's repr of a str, as the messages of _params.py show it.
std::string py_repr(const std::string& s) {
  bool single = s.find('\'') != std::string::npos && s.find('"') == std::string::npos;
  char quote = single ? '"' : '\'';
  std::string out(1, quote);
  for (char ch : s) {
    if (ch == '\\' || ch == quote) out += '\\';
    out += ch;
  }
  return out + quote;
}

std::string strip(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\n\r\f\v"), e = s.find_last_not_of(" \t\n\r\f\v");
  return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

// eps from its string: a finite number >= 0.
bool parse_eps(const Attrs& attrs, double* eps) {
  auto it = attrs.find("eps");
  if (it == attrs.end()) {
    *eps = 1e-3;
    return true;
  }
  std::string text = strip(it->second);
  char* end = nullptr;
  // strtod also reads hexadecimal floats; Python's float() does not.
  bool hex = text.find_first_of("xX") != std::string::npos;
  double value = text.empty() || hex ? 0.0 : std::strtod(text.c_str(), &end);
  if (text.empty() || hex || *end != '\0') {
    fail_message() << "eps must be a number, got " << py_repr(it->second);
    return false;
  }
  if (!std::isfinite(value) || value < 0) {
    fail_message() << "eps must be a finite number >= 0, got " << py_repr(it->second);
    return false;
  }
  *eps = value;
  return true;
}

bool parse_axis(const Attrs& attrs, int* axis) {
  auto it = attrs.find("axis");
  if (it == attrs.end()) {
    *axis = 1;
    return true;
  }
  std::string text = strip(it->second);
  char* end = nullptr;
  errno = 0;
  long value = text.empty() ? 0 : std::strtol(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0' || errno != 0 || value > 1000000 || value < -1000000) {
    fail_message() << "axis must be an integer, got " << py_repr(it->second);
    return false;
  }
  *axis = static_cast<int>(value);
  return true;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << (shape.size() == 1 ? ",)" : ")");
  return os.str();
}

// The channel axis of data of rank `ndim` as a non-negative index.
bool channel_axis(int axis, int ndim, int* out) {
  int ax = axis < 0 ? axis + ndim : axis;
  if (ax < 0 || ax >= ndim) {
    fail_message() << "axis " << axis << " is out of range for data of rank " << ndim
                 << " (valid: " << -ndim + 1 << ".." << ndim - 1 << ", not 0)";
    return false;
  }
  if (ax == 0) {
    fail_message() << "axis " << axis << " is the batch axis; InstanceNorm normalizes each batch "
                 << "item separately, pick a channel axis in 1.." << ndim - 1;
    return false;
  }
  *out = ax;
  return true;
}

// (N, A, C, B) of `shape` (validated) for channel axis `axis`.
bool layout_of(const std::vector<int64_t>& shape, int axis, mx_instnorm::Layout* lay) {
  const int ndim = static_cast<int>(shape.size());
  if (ndim < 3) {
    fail_message() << "InstanceNorm needs data of rank >= 3 (batch, channel, spatial...), got rank "
                 << ndim << ", shape " << shape_text(shape);
    return false;
  }
  int ax = 0;
  if (!channel_axis(axis, ndim, &ax)) return false;
  lay->n = shape[0];
  lay->a = 1;
  for (int i = 1; i < ax; ++i) lay->a *= shape[i];
  lay->c = shape[ax];
  lay->b = 1;
  for (int i = ax + 1; i < ndim; ++i) lay->b *= shape[i];
  return true;
}

// MXNet's dtype code for bfloat16 (mshadow::kBfloat16): lib_api.h's
// MXDType does not list it, but library operators receive it.
constexpr int kMxBfloat16 = 12;

const char* dtype_name(int t) {
  switch (t) {
    case mxnet::ext::kFloat32: return "float32";
    case mxnet::ext::kFloat64: return "float64";
    case mxnet::ext::kFloat16: return "float16";
    case kMxBfloat16: return "bfloat16";
    case mxnet::ext::kUint8: return "uint8";
    case mxnet::ext::kInt32: return "int32";
    case mxnet::ext::kInt8: return "int8";
    case mxnet::ext::kInt64: return "int64";
    default: return "unknown";
  }
}

bool is_float(int t) {
  return t == mxnet::ext::kFloat16 || t == mxnet::ext::kFloat32 || t == mxnet::ext::kFloat64 ||
         t == kMxBfloat16;
}

bool is_half(int t) { return t == mxnet::ext::kFloat16 || t == kMxBfloat16; }

mx_instnorm::DType kernel_dtype(int t) {
  return t == mxnet::ext::kFloat16    ? mx_instnorm::kFloat16
       : t == kMxBfloat16 ? mx_instnorm::kBfloat16
       : t == mxnet::ext::kFloat64  ? mx_instnorm::kFloat64 : mx_instnorm::kFloat32;
}

// check_dtypes of _params.py: data float16/bfloat16/32/64; gamma and beta
// the data's dtype, or both float32 with float16 or bfloat16 data.
bool check_dtypes(int data, int gamma, int beta) {
  if (!is_float(data)) {
    fail_message() << "InstanceNorm data must be float16, bfloat16, float32 or float64, got "
                 << dtype_name(data);
    return false;
  }
  if (gamma != beta) {
    fail_message() << "gamma and beta must have the same dtype, got gamma " << dtype_name(gamma)
                 << " and beta " << dtype_name(beta);
    return false;
  }
  bool ok = gamma == data || (is_half(data) && gamma == mxnet::ext::kFloat32);
  if (!ok) {
    fail_message() << "gamma/beta dtype " << dtype_name(gamma) << " does not match data dtype "
                 << dtype_name(data) << " (allowed: " << dtype_name(data)
                 << (is_half(data) ? ", float32)" : ")");
    return false;
  }
  return true;
}

bool check_param_shape(const char* name, const std::vector<int64_t>& shape, int64_t channels) {
  if (shape.size() == 1 && shape[0] == channels) return true;
  fail_message() << name << " must have shape (" << channels << ",) to match the " << channels
               << " channels of data, got shape " << shape_text(shape);
  return false;
}

bool check_cpu(const std::vector<MXTensor>& tensors) {
  for (const MXTensor& t : tensors) {
    if (t.ctx.dev_type != "cpu") {
      fail_message() << "mx_instnorm_InstanceNorm runs on CPU only, got a " << t.ctx.dev_type
                   << " array";
      return false;
    }
  }
  return true;
}

int threads_or_fail() {
  std::string error;
  int threads = mx_instnorm::num_threads_from_env(&error);
  if (threads == 0) fail_message() << error;
  return threads;
}

// --------------------------------------------------------- lib_api glue --

MXReturnValue parseAttrs(const Attrs& attrs, int* num_in, int* num_out) {
  double eps;
  int axis;
  if (!parse_eps(attrs, &eps) || !parse_axis(attrs, &axis)) return MX_FAIL;
  // MXNet adds its own attributes (__ctx_group__, __lr_mult__, ...) to a
  // node's dictionary: they are not ours to judge. std::map: sorted names.
  std::map<std::string, std::string> unknown;
  for (const auto& kv : attrs) {
    const std::string& k = kv.first;
    bool dunder = k.size() >= 4 && k.compare(0, 2, "__") == 0 && k.compare(k.size() - 2, 2, "__") == 0;
    if (k != "eps" && k != "axis" && !dunder) unknown[k] = kv.second;
  }
  if (!unknown.empty()) {
    std::ostringstream os;
    os << "mx_instnorm_InstanceNorm got unknown keyword" << (unknown.size() > 1 ? "s " : " ");
    bool first = true;
    for (const auto& kv : unknown) {
      os << (first ? "" : ", ") << kv.first << "=" << py_repr(kv.second);
      first = false;
    }
    os << "; accepted keywords: eps, axis";
    fail_message() << os.str();
    return MX_FAIL;
  }
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
  if (!check_dtypes(data, gamma, beta)) return MX_FAIL;
  (*out)[0] = data;
  return MX_SUCCESS;
}

MXReturnValue inferShape(const Attrs& attrs, std::vector<std::vector<unsigned int>>* in,
                         std::vector<std::vector<unsigned int>>* out) {
  double eps;
  int axis;
  if (!parse_eps(attrs, &eps) || !parse_axis(attrs, &axis)) return MX_FAIL;
  const std::vector<unsigned int>& data = (*in)[0];
  std::vector<int64_t> shape(data.begin(), data.end());
  mx_instnorm::Layout lay;
  // An unknown shape reaches the library as an empty one (MXNet's shim
  // drops ndim -1), indistinguishable from a scalar. (With the data shape
  // unknown and a parameter shape unknown too, MXNet's shim fails before
  // calling us, with std::bad_alloc.)
  if (shape.empty()) {
    fail_message() << "InstanceNorm needs data of rank >= 3 (batch, channel, spatial...), got "
                   << "rank 0 or an unknown shape: the compiled operator infers shapes from "
                   << "the data shape only";
    return MX_FAIL;
  }
  // A size MXNet does not know yet (legacy shape rules also read a 0 so)
  // arrives as -1 cast to unsigned; an output can only carry known sizes,
  // so the data's must all be known.
  for (unsigned int d : data) {
    if (d == 0xFFFFFFFFu) {
      std::vector<int64_t> shown;
      for (unsigned int e : data) shown.push_back(e == 0xFFFFFFFFu ? -1 : e);
      fail_message() << "the data shape " << shape_text(shown) << " is not fully known (-1 "
                     << "is unknown; under MXNet's legacy shape rules a 0 is too): the "
                     << "compiled operator needs every size";
      return MX_FAIL;
    }
  }
  if (!layout_of(shape, axis, &lay)) return MX_FAIL;
  const char* names[2] = {"gamma", "beta"};
  for (int i = 1; i <= 2; ++i) {
    std::vector<unsigned int>& p = (*in)[i];
    // Not known yet: no shape, or rank 1 with an unknown size, which MXNet
    // hands over as -1 cast to unsigned (Gluon's deferred parameters, the
    // variables mx_instnorm's sym function makes).
    if (p.empty() || (p.size() == 1 && (p[0] == 0u || p[0] == 0xFFFFFFFFu))) {
      p.assign(1, static_cast<unsigned int>(lay.c));
    } else if (!check_param_shape(names[i - 1], std::vector<int64_t>(p.begin(), p.end()), lay.c)) {
      return MX_FAIL;
    }
  }
  (*out)[0] = data;
  return MX_SUCCESS;
}

MXReturnValue forward(const Attrs& attrs, std::vector<MXTensor>* inputs,
                      std::vector<MXTensor>* outputs, const OpResource&) {
  double eps;
  int axis;
  if (!parse_eps(attrs, &eps) || !parse_axis(attrs, &axis)) return MX_FAIL;
  if (inputs->size() != 3 || outputs->size() != 1) {
    fail_message() << "mx_instnorm_InstanceNorm takes 3 inputs and 1 output, got "
                 << inputs->size() << " and " << outputs->size();
    return MX_FAIL;
  }
  if (!check_cpu(*inputs) || !check_cpu(*outputs)) return MX_FAIL;
  MXTensor& x = (*inputs)[0];
  mx_instnorm::Layout lay;
  if (!layout_of(x.shape, axis, &lay)) return MX_FAIL;
  if (!check_param_shape("gamma", (*inputs)[1].shape, lay.c) ||
      !check_param_shape("beta", (*inputs)[2].shape, lay.c) ||
      !check_dtypes(x.dtype, (*inputs)[1].dtype, (*inputs)[2].dtype))
    return MX_FAIL;
  int threads = threads_or_fail();
  if (threads == 0) return MX_FAIL;
  std::string error;
  if (!mx_instnorm::forward(lay, kernel_dtype(x.dtype), kernel_dtype((*inputs)[1].dtype),
                            x.data_ptr, (*inputs)[1].data_ptr, (*inputs)[2].data_ptr, eps,
                            (*outputs)[0].data_ptr, nullptr, nullptr, threads, &error)) {
    fail_message() << error;
    return MX_FAIL;
  }
  return MX_SUCCESS;
}

MXReturnValue backward(const Attrs& attrs, std::vector<MXTensor>* inputs,
                       std::vector<MXTensor>* outputs, const OpResource&) {
  double eps;
  int axis;
  if (!parse_eps(attrs, &eps) || !parse_axis(attrs, &axis)) return MX_FAIL;
  // Output gradient, inputs (3), output.
  if (inputs->size() != 5 || outputs->size() != 3) {
    fail_message() << "mx_instnorm_InstanceNorm backward takes 5 inputs and 3 outputs, got "
                 << inputs->size() << " and " << outputs->size();
    return MX_FAIL;
  }
  if (!check_cpu(*inputs) || !check_cpu(*outputs)) return MX_FAIL;
  MXTensor& dy = (*inputs)[0];
  MXTensor& x = (*inputs)[1];
  MXTensor& gamma = (*inputs)[2];
  mx_instnorm::Layout lay;
  if (!layout_of(x.shape, axis, &lay)) return MX_FAIL;
  // MXNet 1.9.1 gives memory even to gradients nobody asked for (measured:
  // autograd without attach_grad, grad_req 'null' in an executor); one
  // without memory, or of another size, is skipped rather than trusted.
  auto target = [](MXTensor& t, int64_t size) -> void* {
    return t.data_ptr != nullptr && t.size() == size ? t.data_ptr : nullptr;
  };
  const int64_t total = lay.n * lay.a * lay.c * lay.b;
  int threads = threads_or_fail();
  if (threads == 0) return MX_FAIL;
  std::string error;
  if (!mx_instnorm::backward(lay, kernel_dtype(x.dtype), kernel_dtype(gamma.dtype),
                             dy.data_ptr, x.data_ptr, gamma.data_ptr, eps,
                             target((*outputs)[0], total),
                             target((*outputs)[1], lay.c), target((*outputs)[2], lay.c),
                             threads, &error)) {
    fail_message() << error;
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

MXReturnValue initialize(int version) {
  // The library API with this MX_LIBRARY_VERSION is MXNet 1.9's; MXNet
  // itself refuses a library whose version constant differs.
  if (version >= 10700 && version < 20000) return MX_SUCCESS;
  fail_message() << "mx_instnorm's compiled operator does not support MXNet version " << version;
  return MX_FAIL;
}
