// torch_ops.cpp -- libfastvae_torch: fastvae's CPU and CUDA kernels as kernels of torch's
// dispatcher, autograd included, so that an eager call costs what an ATen op's does (no Python
// per call, forward or backward).
//
// Optional: built only when torch is importable at build time (CMakeLists.txt), against that
// torch's C++ ABI; the torch-independent C library (libfastvae_native, csrc/fastvae.h) stays the
// one home of the kernels, and this file only describes calls to it (fv_call) from tensors.
//
// What is registered comes from Python's op table (fastvae/ops/custom_ops.py OPS): for each row
// with a native implementation here, fastvae/ops/native_dispatch.py defines the overloads
// fastvae::<op>.native and fastvae::<op>_backward.native (the same schemas as the Python custom
// ops) with their fake kernels, and calls fv_torch_register() with the row's structure. This
// file then registers, for every such row, the same generic boxed kernels:
//   CPU / CUDA, forward:  the row's forward (the marshaller below), then its reduction;
//   CPU / CUDA, backward: the reduction's gradient, then the row's backward marshaller;
//   Autograd, forward:    a Node (NativeBackward) whose apply calls the backward overload
//                         through the dispatcher (so profilers name it);
//   Autograd, backward:   an error node on its outputs (second derivatives are refused, as
//                         the Python custom ops refuse them).
// Per op there is only the marshaller: the fv_call of csrc/fastvae.h built from the op's
// tensors, as fastvae/ops/native.py's NativeBackend methods build it (bitwise the same calls).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "fastvae.h"

namespace {

using at::Tensor;
using c10::IValue;
using torch::jit::Stack;
using torch::autograd::variable_list;

constexpr int64_t kNone = 0, kSum = 1, kMean = 2;  // reduction codes (custom_ops.py)

// ---------------------------------------------------------------------------------------------
// One fv_call
// ---------------------------------------------------------------------------------------------

int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return FV_FLOAT32;
    case at::kDouble: return FV_FLOAT64;
    case at::kHalf: return FV_FLOAT16;
    case at::kBFloat16: return FV_BFLOAT16;
    case at::kLong: return FV_INT64;
    default: TORCH_CHECK(false, "fastvae: unsupported dtype ", t);
  }
}

at::ScalarType compute_dtype(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// An fv_tensor slot: (K, B, N) element strides; 2-D tensors (B, N), 1-D ones along N.
void set_slot(fv_tensor& s, const Tensor& t) {
  if (!t.defined()) return;  // data == NULL: absent
  s.data = t.data_ptr();
  s.dtype = dtype_code(t.scalar_type());
  const int64_t d = t.dim();
  for (int64_t i = 0; i < 3; ++i) s.stride[i] = i >= 3 - d ? t.stride(i - (3 - d)) : 0;
}

void set_slot(fv_tensor& s, const Tensor& t, int64_t s0, int64_t s1, int64_t s2) {
  s.data = t.data_ptr();
  s.dtype = dtype_code(t.scalar_type());
  s.stride[0] = s0;
  s.stride[1] = s1;
  s.stride[2] = s2;
}

struct Call {
  fv_call c;
  explicit Call(const Tensor& like, int64_t K = 1) {
    std::memset(&c, 0, sizeof c);
    c.B = like.size(0);
    c.N = like.size(1);
    c.K = K;
    c.reduce_dim = 1;
    c.compute = dtype_code(compute_dtype(like));
  }
  Call& in(int i, const Tensor& t) { set_slot(c.in[i], t); return *this; }
  Call& out(int i, const Tensor& t) { set_slot(c.out[i], t); return *this; }
  // A (B,) or (N,) gradient of a sum as a broadcast (B, N) operand in the compute dtype.
  Call& rows(int i, Tensor g, int64_t reduce_dim) {
    const auto cdt = c.compute == FV_FLOAT64 ? at::kDouble : at::kFloat;
    if (g.scalar_type() != cdt) g = g.to(cdt);
    keep.push_back(g);
    const int64_t s = g.stride(0);
    set_slot(c.in[i], g, 0, reduce_dim == 1 ? s : 0, reduce_dim == 1 ? 0 : s);
    return *this;
  }
  Call& seed(const Tensor& t) { c.seed = t.defined() ? t.data_ptr<int64_t>() : nullptr; return *this; }
  std::vector<Tensor> keep;  // converted operands, alive until the call ran
};

void run(int32_t op, const char* name, Call& call, const Tensor& like) {
  if (call.c.B == 0 || call.c.N == 0) return;  // empty: the generic layer writes the zeros
  int32_t status;
  if (like.device().is_cpu()) {
    call.c.n_threads = at::get_num_threads();
    status = fv_cpu_run(op, &call.c);
  } else {
    TORCH_CHECK(like.device().is_cuda(), "fastvae: no native kernels for ", like.device());
    const c10::Device device = like.device();
    const auto* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
    call.c.device = device.index() >= 0 ? device.index() : impl->getDevice().index();
    call.c.stream = impl->getStream(c10::Device(c10::DeviceType::CUDA, call.c.device))
                        .native_handle();
    const int64_t nbytes = fv_cuda_workspace_bytes(op, &call.c);
    Tensor workspace;
    if (nbytes > 0) {
      workspace = at::empty({nbytes}, like.options().dtype(at::kByte));
      call.c.workspace = workspace.data_ptr();
      call.c.workspace_bytes = nbytes;
    }
    status = fv_cuda_run(op, &call.c);
  }
  TORCH_CHECK(status == FV_OK, "fastvae ", like.device().is_cpu() ? "cpu" : "cuda",
              " backend, ", name, ": ", fv_last_error());
}

Tensor empty_like_rows(bool need, c10::IntArrayRef shape, const Tensor& like) {
  return need ? at::empty(shape, like.options()) : Tensor();
}

Tensor sum_out(const Tensor& like, int64_t reduce_dim) {
  return at::empty({reduce_dim == 1 ? like.size(0) : like.size(1)},
                   like.options().dtype(compute_dtype(like)));
}

std::vector<Tensor> present(std::initializer_list<Tensor> outs) {
  std::vector<Tensor> r;
  for (const auto& t : outs)
    if (t.defined()) r.push_back(t);
  return r;
}

// ---------------------------------------------------------------------------------------------
// The marshallers: one forward and one backward per op, the fv_call of NativeBackend's method of
// that name (fastvae/ops/native.py). Arguments: the row's tensors (undefined = None) and
// attributes (the forward's without `reduction`; the backward's as the row names them, without
// `reduction`), and for backward ops the output gradients first and `needs` last.
// ---------------------------------------------------------------------------------------------

using Tensors = std::vector<Tensor>;
using Attrs = std::vector<IValue>;
using Forward = Tensors (*)(const Tensors& t, const Attrs& a);
using Backward = Tensors (*)(const Tensors& g, const Tensors& t, const Attrs& a,
                             const std::vector<bool>& needs);

#define FV_RUN(OP, call, like) run(FV_OP_##OP, fv_op_name(FV_OP_##OP), call, like)

// -> (z, the noise kept for the backward: (K, B, N) when keep_noise, else empty)
Tensors reparameterize_fwd(const Tensors& t, const Attrs& a) {
  const Tensor &mu = t[0], &logvar = t[1], &eps = t[2], &seed = t[3];
  const int64_t K = a[0].toInt();
  const bool keep = a[1].toBool() && !eps.defined();
  Tensor z = at::empty({K, mu.size(0), mu.size(1)}, mu.options());
  Tensor noise = keep ? at::empty({K, mu.size(0), mu.size(1)}, mu.options())
                      : at::empty({0}, mu.options());
  Call call(mu, K);
  call.in(0, mu).in(1, logvar).in(2, eps).out(0, z).seed(eps.defined() ? Tensor() : seed);
  if (keep) call.out(1, noise);
  FV_RUN(REPARAMETERIZE_FWD, call, mu);
  return {z, noise};
}

Tensors reparameterize_bwd(const Tensors& g, const Tensors& t, const Attrs&,
                           const std::vector<bool>& needs) {
  const Tensor &grad_z = g[0], &noise = g[1], &mu = t[0], &logvar = t[1], &seed = t[3];
  // the noise kept by the forward reads as a given eps (bitwise the one regenerated)
  const Tensor eps = t[2].defined() ? t[2] : noise.numel() > 0 ? noise : Tensor();
  const int64_t K = grad_z.size(0), B = mu.size(0), N = mu.size(1);
  Tensor d_mu = empty_like_rows(needs[0], {B, N}, mu);
  Tensor d_lv = empty_like_rows(needs[1], {B, N}, logvar);
  Tensor d_eps = empty_like_rows(needs[2], {K, B, N}, t[2].defined() ? t[2] : mu);
  Call call(mu, K);
  call.in(0, grad_z).in(1, logvar).in(2, eps).out(0, d_mu).out(1, d_lv).out(2, d_eps);
  call.seed(!eps.defined() && needs[1] ? seed : Tensor());
  FV_RUN(REPARAMETERIZE_BWD, call, mu);
  return present({d_mu, d_lv, d_eps});
}

Tensors gaussian_kl_fwd(const Tensors& t, const Attrs& a) {
  const int64_t reduce_dim = a[0].toInt();
  Tensor kl = sum_out(t[0], reduce_dim);
  Call call(t[0]);
  call.in(0, t[0]).in(1, t[1]).in(2, t[2]).in(3, t[3]).out(0, kl);
  call.c.reduce_dim = static_cast<int32_t>(reduce_dim);
  FV_RUN(GAUSSIAN_KL_FWD, call, t[0]);
  return {kl};
}

Tensors gaussian_kl_bwd(const Tensors& g, const Tensors& t, const Attrs& a,
                        const std::vector<bool>& needs) {
  const Tensor& mu = t[0];
  const int64_t reduce_dim = a[0].toInt(), B = mu.size(0), N = mu.size(1);
  Tensors outs;
  Call call(mu);
  call.rows(0, g[0], reduce_dim).in(1, mu).in(2, t[1]).in(3, t[2]).in(4, t[3]);
  for (int i = 0; i < 4; ++i) {
    Tensor d = empty_like_rows(needs[i], {B, N}, mu);
    if (d.defined()) {
      call.out(i, d);
      outs.push_back(d);
    }
  }
  call.c.reduce_dim = static_cast<int32_t>(reduce_dim);
  FV_RUN(GAUSSIAN_KL_BWD, call, mu);
  return outs;
}

// bernoulli_nll and continuous_bernoulli_nll: (logits, target) -> nll; one pair serves both.
template <int32_t OP>
Tensors logits_fwd(const Tensors& t, const Attrs&) {
  Tensor nll = sum_out(t[0], 1);
  Call call(t[0]);
  call.in(0, t[0]).in(1, t[1]).out(0, nll);
  run(OP, fv_op_name(OP), call, t[0]);
  return {nll};
}

template <int32_t OP>
Tensors logits_bwd(const Tensors& g, const Tensors& t, const Attrs&,
                   const std::vector<bool>& needs) {
  const Tensor& logits = t[0];
  const int64_t B = logits.size(0), N = logits.size(1);
  Tensor d0 = empty_like_rows(needs[0], {B, N}, logits);
  Tensor d1 = empty_like_rows(needs[1], {B, N}, logits);
  Call call(logits);
  call.rows(0, g[0], 1).in(1, logits).in(2, t[1]).out(0, d0).out(1, d1);
  run(OP, fv_op_name(OP), call, logits);
  return present({d0, d1});
}

Tensors gaussian_nll_fwd(const Tensors& t, const Attrs& a) {
  Tensor nll = sum_out(t[0], 1);
  Call call(t[0]);
  call.in(0, t[0]).in(1, t[1]).in(2, t[2]).out(0, nll);
  call.c.scalar = a[0].toDouble();
  FV_RUN(GAUSSIAN_NLL_FWD, call, t[0]);
  return {nll};
}

Tensors gaussian_nll_bwd(const Tensors& g, const Tensors& t, const Attrs& a,
                         const std::vector<bool>& needs) {
  const Tensor& mean = t[0];
  const int64_t B = mean.size(0), N = mean.size(1);
  Tensor d[3];
  Call call(mean);
  call.rows(0, g[0], 1).in(1, mean).in(2, t[1]).in(3, t[2]);
  for (int i = 0; i < 3; ++i) {
    d[i] = empty_like_rows(needs[i], {B, N}, mean);
    call.out(i, d[i]);
  }
  call.c.scalar = a[0].toDouble();
  FV_RUN(GAUSSIAN_NLL_BWD, call, mean);
  return present({d[0], d[1], d[2]});
}

Tensors sample_and_kl_fwd(const Tensors& t, const Attrs& a) {
  const Tensor &mu = t[0], &logvar = t[1], &seed = t[2];
  const int64_t reduce_dim = a[0].toInt();
  Tensor z = at::empty(mu.sizes(), mu.options());
  Tensor kl = sum_out(mu, reduce_dim);
  Call call(mu);
  call.in(0, mu).in(1, logvar).out(0, z).out(1, kl).seed(seed);
  call.c.reduce_dim = static_cast<int32_t>(reduce_dim);
  FV_RUN(SAMPLE_AND_KL_FWD, call, mu);
  return {z, kl};
}

Tensors sample_and_kl_bwd(const Tensors& g, const Tensors& t, const Attrs& a,
                          const std::vector<bool>& needs) {
  const Tensor &mu = t[0], &logvar = t[1], &seed = t[2];
  const int64_t reduce_dim = a[0].toInt(), B = mu.size(0), N = mu.size(1);
  Tensor d_mu = empty_like_rows(needs[0], {B, N}, mu);
  Tensor d_lv = empty_like_rows(needs[1], {B, N}, logvar);
  Call call(mu);
  call.in(0, g[0]).rows(1, g[1], reduce_dim).in(2, mu).in(3, logvar).out(0, d_mu).out(1, d_lv);
  call.seed(needs[1] ? seed : Tensor());
  call.c.reduce_dim = static_cast<int32_t>(reduce_dim);
  FV_RUN(SAMPLE_AND_KL_BWD, call, mu);
  return present({d_mu, d_lv});
}

#undef FV_RUN

struct Marshaller {
  const char* method;  // the row's method (custom_ops.OpSpec.method)
  Forward forward;
  Backward backward;
};

// The ops served here; a row of custom_ops.OPS not listed keeps the Python path.
const Marshaller kMarshallers[] = {
    {"reparameterize", reparameterize_fwd, reparameterize_bwd},
    {"gaussian_kl", gaussian_kl_fwd, gaussian_kl_bwd},
    {"bernoulli_nll", logits_fwd<FV_OP_BERNOULLI_NLL_FWD>, logits_bwd<FV_OP_BERNOULLI_NLL_BWD>},
    {"gaussian_nll", gaussian_nll_fwd, gaussian_nll_bwd},
    {"sample_and_kl", sample_and_kl_fwd, sample_and_kl_bwd},
    {"continuous_bernoulli_nll", logits_fwd<FV_OP_CONTINUOUS_BERNOULLI_NLL_FWD>,
     logits_bwd<FV_OP_CONTINUOUS_BERNOULLI_NLL_BWD>},
};

// ---------------------------------------------------------------------------------------------
// The rows, and the generic kernels
// ---------------------------------------------------------------------------------------------

struct Row {
  std::string name;           // fastvae::<name>, fastvae::<name>_backward
  int64_t n_tensors = 0;      // the forward's tensors (schema: tensors, attributes, backend)
  int64_t n_attrs = 0;
  int64_t n_outputs = 1;
  int64_t grads = 0;          // the first `grads` tensors take gradients
  int64_t reduction_at = -1;  // index of `reduction` among the attributes, or -1
  int64_t per_sample = -1;    // the output that `reduction` reduces
  std::vector<int64_t> backward_attrs;      // attribute indices the backward takes, in order
  std::vector<int64_t> non_differentiable;  // outputs without gradient
  std::vector<int64_t> saved_outputs;       // outputs the backward reads (non-differentiable)
  const Marshaller* kernels = nullptr;
  std::optional<c10::OperatorHandle> backward_op;  // fastvae::<name>_backward.native
};

std::mutex rows_mutex;
std::unordered_map<std::string, std::unique_ptr<Row>>& rows() {
  static std::unordered_map<std::string, std::unique_ptr<Row>> r;
  return r;
}

// The forward's tensors from the stack (None -> undefined).
Tensors tensor_args(const Stack& stack, size_t first, int64_t n) {
  Tensors t(n);
  for (int64_t i = 0; i < n; ++i) {
    const IValue& v = stack[first + i];
    if (!v.isNone()) t[i] = v.toTensor();
  }
  return t;
}

bool is_empty(const Tensors& t) { return t[0].numel() == 0; }

// The fake kernel's zeros for an empty input: shapes as the marshallers allocate.
Tensor reduce(const Tensor& per_sample, int64_t reduction) {
  if (reduction == kSum) return per_sample.sum();
  if (reduction == kMean) return per_sample.mean();
  return per_sample;
}

// CPU / CUDA kernel of fastvae::<op>.native: (*tensors, *attributes, backend) -> outputs.
struct ForwardKernel final : c10::OperatorKernel {
  const Row* row;
  explicit ForwardKernel(const Row* r) : row(r) {}
  void operator()(const c10::OperatorHandle&, c10::DispatchKeySet, Stack* stack) {
    const size_t n_args = row->n_tensors + row->n_attrs + 1;
    const size_t first = stack->size() - n_args;
    Tensors t = tensor_args(*stack, first, row->n_tensors);
    Attrs attrs;
    int64_t reduction = kNone;
    for (int64_t i = 0; i < row->n_attrs; ++i) {
      const IValue& v = (*stack)[first + row->n_tensors + i];
      if (i == row->reduction_at)
        reduction = v.toInt();
      else
        attrs.push_back(v);
    }
    const auto& backend = (*stack)[first + n_args - 1].toStringRef();
    TORCH_CHECK(backend == c10::DeviceTypeName(t[0].device().type(), /*lower_case=*/true),
                "fastvae::", row->name, ": backend '", backend, "' cannot serve ",
                t[0].device().type(), " tensors");
    Tensors out = row->kernels->forward(t, attrs);
    if (is_empty(t))  // nothing computed: every output is zeros (the fake kernel's shapes)
      for (auto& o : out) o.zero_();
    if (reduction != kNone) out[row->per_sample] = reduce(out[row->per_sample], reduction);
    torch::jit::drop(*stack, n_args);
    for (auto& o : out) stack->emplace_back(std::move(o));
  }
};

// CPU / CUDA kernel of fastvae::<op>_backward.native:
// (*grads, *tensors, *backward attributes, backend, needs) -> gradients asked for.
struct BackwardKernel final : c10::OperatorKernel {
  const Row* row;
  explicit BackwardKernel(const Row* r) : row(r) {}
  void operator()(const c10::OperatorHandle&, c10::DispatchKeySet, Stack* stack) {
    // the output gradients, then the saved outputs (the marshaller reads both in `grads`)
    const int64_t n_grads = row->n_outputs - static_cast<int64_t>(row->non_differentiable.size()) +
                            static_cast<int64_t>(row->saved_outputs.size());
    const int64_t n_attrs = static_cast<int64_t>(row->backward_attrs.size());
    const size_t n_args = n_grads + row->n_tensors + n_attrs + 2;
    const size_t first = stack->size() - n_args;
    Tensors grads = tensor_args(*stack, first, n_grads);
    Tensors t = tensor_args(*stack, first + n_grads, row->n_tensors);
    Attrs attrs;
    int64_t reduction = kNone;
    for (int64_t i = 0; i < n_attrs; ++i) {
      const IValue& v = (*stack)[first + n_grads + row->n_tensors + i];
      if (row->backward_attrs[i] == row->reduction_at)
        reduction = v.toInt();
      else
        attrs.push_back(v);
    }
    std::vector<bool> needs;
    for (bool v : (*stack)[first + n_args - 1].toBoolList().vec()) needs.push_back(v);
    if (reduction != kNone) {  // the per-sample gradient of a sum or a mean: one value per row
      const int64_t B = t[0].size(0);
      Tensor& g = grads[row->per_sample];
      g = (reduction == kSum ? g : g / B).expand({B});
    }
    Tensors out;
    if (is_empty(t)) {
      for (int64_t i = 0; i < row->grads; ++i)
        if (needs[i]) out.push_back(at::zeros_like(t[i], at::MemoryFormat::Contiguous));
    } else {
      out = row->kernels->backward(grads, t, attrs, needs);
    }
    torch::jit::drop(*stack, n_args);
    stack->emplace_back(c10::List<Tensor>(out));
  }
};

// Nodes are shared_ptr in some torch releases and intrusive_ptr in others.
using NodePtr = decltype(torch::autograd::Edge::function);
template <class P>
struct MakeNode;
template <class T>
struct MakeNode<std::shared_ptr<T>> {
  template <class N, class... A>
  static std::shared_ptr<N> make(A&&... a) { return std::make_shared<N>(std::forward<A>(a)...); }
};
template <class T>
struct MakeNode<c10::intrusive_ptr<T>> {
  template <class N, class... A>
  static c10::intrusive_ptr<N> make(A&&... a) {
    return c10::make_intrusive<N>(std::forward<A>(a)...);
  }
};
template <class N, class... A>
auto make_node(A&&... a) {
  return MakeNode<NodePtr>::template make<N>(std::forward<A>(a)...);
}

// The backward of one forward call: the backward overload, through the dispatcher.
struct NativeBackward final : torch::autograd::Node {
  const Row* row;
  std::vector<torch::autograd::SavedVariable> saved_out;  // the row's saved outputs
  std::vector<torch::autograd::SavedVariable> saved;  // the forward's tensors
  std::vector<IValue> attrs;                            // the backward's attributes
  std::string backend;

  explicit NativeBackward(const Row* r) : row(r) {}
  std::string name() const override { return "fastvae::" + row->name + "_backward"; }
  void release_variables() override {
    for (auto& s : saved_out) s.reset_data();
    for (auto& s : saved) s.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    Stack stack;
    // Unused outputs come as undefined gradients: zeros, as autograd.Function materializes them.
    for (size_t i = 0; i < grads.size(); ++i)
      stack.emplace_back(grads[i].defined() ? grads[i] : input_metadata(i).zeros_like());
    for (auto& s : saved_out) stack.emplace_back(s.unpack());
    for (auto& s : saved) {
      Tensor t = s.unpack();
      if (t.defined())
        stack.emplace_back(std::move(t));
      else
        stack.emplace_back();
    }
    for (const auto& a : attrs) stack.push_back(a);
    stack.emplace_back(backend);
    c10::List<bool> needs;
    for (int64_t i = 0; i < row->grads; ++i) needs.push_back(next_edge(i).is_valid());
    stack.emplace_back(needs);
    row->backward_op->callBoxed(&stack);
    auto out = stack.back().toTensorList().vec();
    variable_list result(row->grads);
    size_t k = 0;
    for (int64_t i = 0; i < row->grads; ++i)
      if (needs[i]) result[i] = out[k++];
    return result;
  }
};

// Autograd kernel of fastvae::<op>.native.
struct AutogradForward final : c10::OperatorKernel {
  const Row* row;
  explicit AutogradForward(const Row* r) : row(r) {}
  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet ks, Stack* stack) {
    const size_t n_args = row->n_tensors + row->n_attrs + 1;
    const size_t first = stack->size() - n_args;
    Tensors t = tensor_args(*stack, first, row->n_tensors);
    bool wanted = false;
    if (torch::autograd::GradMode::is_enabled())
      for (int64_t i = 0; i < row->grads; ++i) wanted = wanted || (t[i].defined() && t[i].requires_grad());
    decltype(make_node<NativeBackward>(row)) node;
    if (wanted) {
      node = make_node<NativeBackward>(row);
      std::vector<Tensor> differentiable(t.begin(), t.begin() + row->grads);
      node->set_next_edges(torch::autograd::collect_next_edges(differentiable));
      for (const auto& x : t) node->saved.emplace_back(x, false);
      for (int64_t i : row->backward_attrs) node->attrs.push_back((*stack)[first + row->n_tensors + i]);
      node->backend = (*stack)[first + n_args - 1].toStringRef();
    }
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
    }
    if (!wanted) return;
    const size_t out_first = stack->size() - row->n_outputs;
    for (int64_t i = 0; i < row->n_outputs; ++i) {
      bool nd = false;
      for (int64_t j : row->non_differentiable) nd = nd || j == i;
      if (!nd) torch::autograd::set_history((*stack)[out_first + i].toTensor(), node);
    }
    // saved outputs are non-differentiable ones (native_dispatch.py serves no other row): no
    // history of their own, so saved as plain tensors, no reference cycle through this node
    for (int64_t i : row->saved_outputs)
      node->saved_out.emplace_back((*stack)[out_first + i].toTensor(), /*is_output=*/false);
  }
};

// Autograd kernel of fastvae::<op>_backward.native: its outputs carry an error node when a
// graph is being built through them (create_graph=True), as for the Python custom ops.
struct AutogradBackward final : c10::OperatorKernel {
  const Row* row;
  explicit AutogradBackward(const Row* r) : row(r) {}
  void operator()(const c10::OperatorHandle& op, c10::DispatchKeySet ks, Stack* stack) {
    const int64_t n_grads = row->n_outputs - static_cast<int64_t>(row->non_differentiable.size()) +
                            static_cast<int64_t>(row->saved_outputs.size());
    const size_t n_args = n_grads + row->n_tensors + row->backward_attrs.size() + 2;
    const size_t first = stack->size() - n_args;
    std::vector<Tensor> inputs;
    bool wanted = false;
    if (torch::autograd::GradMode::is_enabled()) {
      for (size_t i = first; i < stack->size(); ++i)
        if ((*stack)[i].isTensor()) {
          inputs.push_back((*stack)[i].toTensor());
          wanted = wanted || inputs.back().requires_grad();
        }
    }
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
    }
    if (!wanted) return;
    auto node = make_node<torch::autograd::Error>(
        "Trying to backward through fastvae." + row->name +
            "_backward.native but no autograd formula was registered (fastvae's ops have no "
            "second derivative)",
        torch::autograd::collect_next_edges(inputs));
    for (const Tensor& g : stack->back().toTensorList().vec())
      if (g.defined()) torch::autograd::set_history(g, node);
  }
};

std::vector<std::unique_ptr<torch::Library>>& libraries() {
  static std::vector<std::unique_ptr<torch::Library>> l;
  return l;
}

void register_row(const Row* row) {
  auto& libs = libraries();
  const std::string fwd = row->name + ".native", bwd = row->name + "_backward.native";
  std::vector<c10::DispatchKey> keys{c10::DispatchKey::CPU};
  if (fv_has_cuda()) keys.push_back(c10::DispatchKey::CUDA);
  for (auto key : keys) {
    libs.push_back(std::make_unique<torch::Library>(torch::Library::IMPL, "fastvae", key,
                                                    __FILE__, __LINE__));
    libs.back()->impl(fwd.c_str(),
                      torch::CppFunction::makeFromBoxedFunctor(std::make_unique<ForwardKernel>(row)));
    libs.back()->impl(bwd.c_str(),
                      torch::CppFunction::makeFromBoxedFunctor(std::make_unique<BackwardKernel>(row)));
  }
  libs.push_back(std::make_unique<torch::Library>(torch::Library::IMPL, "fastvae",
                                                  c10::DispatchKey::Autograd, __FILE__, __LINE__));
  libs.back()->impl(fwd.c_str(),
                    torch::CppFunction::makeFromBoxedFunctor(std::make_unique<AutogradForward>(row)));
  libs.back()->impl(bwd.c_str(),
                    torch::CppFunction::makeFromBoxedFunctor(std::make_unique<AutogradBackward>(row)));
}

}  // namespace

extern "C" {

// For the Python loader (fastvae/ops/native_dispatch.py): 1 when this library serves the row
// whose method is `method`, else 0.
FV_API int32_t fv_torch_serves(const char* method) {
  for (const auto& m : kMarshallers)
    if (std::strcmp(m.method, method) == 0) return 1;
  return 0;
}

// Register the kernels of one row of custom_ops.OPS, whose overloads fastvae::<name>.native and
// fastvae::<name>_backward.native the caller defined. Index lists: `backward_attrs` (n_bw),
// `non_differentiable` (n_nd), `saved_outputs` (n_saved). Returns 0, or -1 (no marshaller for `method`, or registered
// already).
FV_API int32_t fv_torch_register(const char* name, const char* method, int64_t n_tensors,
                                 int64_t n_attrs, int64_t n_outputs, int64_t grads,
                                 int64_t reduction_at, int64_t per_sample,
                                 const int64_t* backward_attrs, int64_t n_bw,
                                 const int64_t* non_differentiable, int64_t n_nd,
                                 const int64_t* saved_outputs, int64_t n_saved) {
  std::lock_guard<std::mutex> lock(rows_mutex);
  const Marshaller* kernels = nullptr;
  for (const auto& m : kMarshallers)
    if (std::strcmp(m.method, method) == 0) kernels = &m;
  if (kernels == nullptr || rows().count(name)) return -1;
  auto row = std::make_unique<Row>();
  row->name = name;
  row->n_tensors = n_tensors;
  row->n_attrs = n_attrs;
  row->n_outputs = n_outputs;
  row->grads = grads;
  row->reduction_at = reduction_at;
  row->per_sample = per_sample;
  row->backward_attrs.assign(backward_attrs, backward_attrs + n_bw);
  row->non_differentiable.assign(non_differentiable, non_differentiable + n_nd);
  row->saved_outputs.assign(saved_outputs, saved_outputs + n_saved);
  row->kernels = kernels;
  row->backward_op = c10::Dispatcher::singleton().findSchemaOrThrow(
      ("fastvae::" + row->name + "_backward").c_str(), "native");
  register_row(row.get());
  rows()[name] = std::move(row);
  return 0;
}

FV_API int32_t fv_torch_abi_version(void) { return FV_ABI_VERSION; }

}  // extern "C"
