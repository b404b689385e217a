// CPU kernels of the LSTM and GRU ops declared in csrc/ops.cpp: cells and whole layers
// (one direction), forward and backward, float32 and float64, float16 and bfloat16.
//
// Fuses: all gate nonlinearities, the state update and the masking by lengths of one
// time step into one C++ loop.  A layer computes the input projection of every step as
// ONE GEMM (ATen) before the time loop; each step then multiplies h by w_hh and runs the
// fused loop in one parallel region split by hidden units: every thread multiplies the
// state by the gate columns of its units (a GEMM tile, csrc/cpu/tile_gemm.h) and applies
// the gate maths to them.  A layer of at most kFewSteps steps takes instead one ATen GEMM
// a step on w_hh as given (the tiles read a transposed copy, which few steps do not win
// back), then the gate maths split the same way.  Backward (BPTT) collects the gate
// gradients of all steps in a (T, B, G) buffer and then gets grad_x, grad_w_ih and
// grad_w_hh as one ATen GEMM each; only grad_gates @ w_hh stays per step, split the
// same way.  The LSTM and GRU layers share one forward and one backward driver
// (layer_forward, layer_backward), parameterised by a per-cell policy (LstmLayerCell,
// GruLayerCell).  The cells (one step) split their fused loop over the batch and use
// ATen GEMMs.
// The equations are those of fastattn.reference; float32 takes tanh and sigmoid from
// fast_tanh (csrc/common/fast_tanh.h, abs error < 4e-7) so that the fused loops
// vectorise (with AVX2+FMA and AVX-512 clones of the cells and layer steps,
// csrc/cpu/isa.h), float64 uses std::exp / std::tanh.
// float16 / bfloat16: the cells take them (gate maths in float32, bfloat16 GEMMs in
// bfloat16, see Cells), and so do the layers: state, buffers, gate maths and the backward's
// time loop in float32, on float32 copies made once a call where needed; on AVX512-BF16 a
// bfloat16 forward's GEMMs in bfloat16 (the input projection from x and w_ih as given,
// each step's from h rounded to bfloat16 and w_hh packed once a call, float32 out:
// csrc/cpu/bfloat16_gemm.h), and a bfloat16 backward's GEMMs on the gate gradients rounded
// to bfloat16 (each step's through w_hh^T packed once a call likewise; grad_x, grad_w_ih and
// grad_w_hh as bfloat16 ATen GEMMs); float16 GEMMs on float32 copies, as in the cells.  Does not handle: LSTM projections (proj_size; the Python side
// falls back to the reference), devices other than the CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/fast_sigmoid.h"
#include "common/fast_tanh.h"
#include "common/layer_shape.h"
#include "cpu/bfloat16_gemm.h"
#include "cpu/isa.h"
#include "cpu/select_bits.h"
#include "cpu/tile_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastattn {
namespace {

constexpr int64_t kLstmGates = 4;  // i, f, g, o
constexpr int64_t kGruGates = 3;   // r, z, n
// Elements of gate maths (a few exp / tanh each) worth one task of at::parallel_for.
constexpr int64_t kPointwiseGrainElements = 16384;

// ---------------------------------------------------------------------------------
// Argument checks: every op checks devices, dtypes and all shapes before it touches a
// pointer, so a direct call with bad shapes raises instead of reading out of bounds.

bool is_low_precision(at::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }

// The cells and the layers take float32, float64, float16 and bfloat16 (see Cells, Layers).
void check_floating_cpu(const char* op, const at::Tensor& reference, const char* reference_name) {
  const auto dtype = reference.scalar_type();
  TORCH_CHECK_VALUE(reference.device().is_cpu(), op, ": expected ", reference_name,
                    " on the CPU, got ", reference.device());
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || is_low_precision(dtype), op,
                   ": the cpu backend supports float32, float64, float16 and bfloat16 only, got ",
                   reference_name, " of dtype ", dtype);
}

void check_same_dtype(const char* op, const at::Tensor& reference, const at::Tensor& tensor,
                      const char* name) {
  TORCH_CHECK_VALUE(tensor.device().is_cpu(), op, ": expected ", name, " on the CPU, got ",
                    tensor.device());
  TORCH_CHECK_TYPE(tensor.scalar_type() == reference.scalar_type(), op, ": expected ", name,
                   " of dtype ", reference.scalar_type(), " like the input, got ", tensor.scalar_type());
}

void check_shape(const char* op, const at::Tensor& tensor, at::IntArrayRef expected,
                 const char* name) {
  TORCH_CHECK_VALUE(tensor.sizes() == expected, op, ": expected ", name, " of shape ", expected,
                    ", got ", tensor.sizes());
}

void check_dim(const char* op, const at::Tensor& tensor, int64_t dim, const char* name) {
  TORCH_CHECK_VALUE(tensor.dim() == dim, op, ": expected ", name, " with ", dim,
                    " dimensions, got shape ", tensor.sizes());
}

// Weights w_ih (G*H, I) and w_hh (G*H, hidden_in) and the optional biases (G*H,).
void check_weights(const char* op, const at::Tensor& reference, const at::Tensor& w_ih,
                   const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                   const std::optional<at::Tensor>& b_hh, int64_t gate_rows, int64_t input_size,
                   int64_t hidden_in) {
  check_same_dtype(op, reference, w_ih, "w_ih");
  check_same_dtype(op, reference, w_hh, "w_hh");
  check_shape(op, w_ih, {gate_rows, input_size}, "w_ih");
  check_shape(op, w_hh, {gate_rows, hidden_in}, "w_hh");
  if (b_ih.has_value() && b_ih->defined()) {
    check_same_dtype(op, reference, *b_ih, "b_ih");
    check_shape(op, *b_ih, {gate_rows}, "b_ih");
  }
  if (b_hh.has_value() && b_hh->defined()) {
    check_same_dtype(op, reference, *b_hh, "b_hh");
    check_shape(op, *b_hh, {gate_rows}, "b_hh");
  }
}

// The hidden size of a stacked weight with `gates` gates: rows / gates, checked.
int64_t hidden_size_of(const char* op, const at::Tensor& w_hh, int64_t gates) {
  check_dim(op, w_hh, 2, "w_hh");
  TORCH_CHECK_VALUE(w_hh.size(0) % gates == 0, op, ": expected w_hh with a multiple of ", gates,
                    " rows (the stacked gates), got shape ", w_hh.sizes());
  return w_hh.size(0) / gates;
}

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() && tensor->defined() ? tensor->contiguous() : at::Tensor();
}

// Lengths (B,) of any integer dtype as contiguous int64, or undefined when absent.
at::Tensor lengths_as_int64(const char* op, const std::optional<at::Tensor>& lengths,
                            int64_t batch) {
  if (!lengths.has_value() || !lengths->defined()) {
    return at::Tensor();
  }
  TORCH_CHECK_TYPE(at::isIntegralType(lengths->scalar_type(), /*includeBool=*/false), op,
                   ": expected integer lengths, got dtype ", lengths->scalar_type());
  check_shape(op, *lengths, {batch}, "lengths");
  return lengths->to(at::kCPU, at::kLong).contiguous();
}

// The input projection of a cell: out (rows, G), a column block of the saved buffer
// = x2d @ w_ih^T (b_ih is added in the fused loop: one pass less over the buffer than
// addmm's broadcast of the bias).
void input_projection_into(at::Tensor out, const at::Tensor& x2d, const at::Tensor& w_ih) {
  matmul_transposed_into(out, x2d, w_ih);
}

// The recurrent projection of a cell: h @ w_hh^T, (rows, G).
at::Tensor hidden_projection(const at::Tensor& h, const at::Tensor& w_hh) {
  at::Tensor out = at::empty({h.size(0), w_hh.size(0)}, h.options());
  matmul_transposed_into(out, h, w_hh);
  return out;
}

// grad of a bias: the gate gradients summed over rows (in their dtype, then in the bias'),
// or empty when there is no bias.
at::Tensor bias_grad(const at::Tensor& bias, const at::Tensor& grad_gates2d) {
  return bias.defined() ? grad_gates2d.sum(0).to(bias.scalar_type())
                        : at::empty({0}, grad_gates2d.options());
}

int64_t rows_per_task(int64_t elements_per_row) {
  return std::max<int64_t>(1, kPointwiseGrainElements / std::max<int64_t>(1, elements_per_row));
}

// Time step t of processing step s (0 = first step the layer computes).
inline int64_t time_of_step(int64_t s, int64_t steps, bool reverse) {
  return reverse ? steps - 1 - s : s;
}

// ---------------------------------------------------------------------------------
// Activations.  float32: tanh through fast_tanh (csrc/common/fast_tanh.h, max abs error
// 4e-7), a rational function without exp, and sigmoid through fast_sigmoid
// (csrc/common/fast_sigmoid.h, accurate relative to its value however small), both
// branch free (csrc/cpu/select_bits.h) so that the compiler vectorises the loops.  float64:
// std::exp and std::tanh.

inline float gate_tanh(float x) { return fast_tanh_with(x, SelectMin{}, SelectMax{}); }
inline float gate_sigmoid(float x) { return fast_sigmoid_with(x, SelectBits{}); }
inline double gate_tanh(double x) { return std::tanh(x); }
inline double gate_sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// ---------------------------------------------------------------------------------
// Fused gate maths of one row (one sequence, one step), shared by the cells and the
// layers.  Gate blocks are contiguous, [gate 0 (H) | gate 1 (H) | ...].  The forward
// rows work in place on the saved buffer, which holds the input projection on entry
// (one GEMM writes it there), so no (T, B, G) buffer of input gates is allocated.  No
// other pointer aliases another (the callers write to separate buffers): the loops
// vectorise.

// Every row function works on `count` hidden units of a row: the gate arrays hold gate k
// of unit j at k * H + j (H: the hidden size, the stride between gate blocks), the state
// arrays unit j at j; a caller passes pointers offset to the first unit of its range.
//
// gates: W_ih x on entry, the activations i, f, g, o on exit.  hidden_gates = W_hh h;
// input_bias = b_ih, hidden_bias = b_hh (zeros when absent).  Writes c' to c_next and
// h' to h_next.
template <typename scalar_t>
inline void lstm_row_forward(scalar_t* __restrict gates, const scalar_t* __restrict hidden_gates,
                             const scalar_t* __restrict input_bias,
                             const scalar_t* __restrict hidden_bias, const scalar_t* __restrict c,
                             int64_t H, int64_t count, scalar_t* __restrict c_next,
                             scalar_t* __restrict h_next) {
  for (int64_t j = 0; j < count; ++j) {
    auto pre_activation = [=](int64_t k) {  // (W_ih x + b_ih) + (W_hh h + b_hh) of gate k
      const int64_t index = k * H + j;
      return (gates[index] + input_bias[index]) + (hidden_gates[index] + hidden_bias[index]);
    };
    const scalar_t i = gate_sigmoid(pre_activation(0));
    const scalar_t f = gate_sigmoid(pre_activation(1));
    const scalar_t g = gate_tanh(pre_activation(2));
    const scalar_t o = gate_sigmoid(pre_activation(3));
    const scalar_t c_new = f * c[j] + i * g;
    gates[j] = i;
    gates[H + j] = f;
    gates[2 * H + j] = g;
    gates[3 * H + j] = o;
    c_next[j] = c_new;
    h_next[j] = o * gate_tanh(c_new);
  }
}
// grad_h + grad_output: the gradient reaching h'; grad_c: reaching c'.  Writes the
// gradients of the gate pre-activations to grad_gates and the gradient of c to grad_c_prev.
template <typename scalar_t>
inline void lstm_row_backward(const scalar_t* __restrict grad_h,
                              const scalar_t* __restrict grad_output,
                              const scalar_t* __restrict grad_c, const scalar_t* __restrict gates,
                              const scalar_t* __restrict c_prev, const scalar_t* __restrict c_next,
                              int64_t H, int64_t count, scalar_t* __restrict grad_gates,
                              scalar_t* __restrict grad_c_prev) {
  for (int64_t j = 0; j < count; ++j) {
    const scalar_t i = gates[j];
    const scalar_t f = gates[H + j];
    const scalar_t g = gates[2 * H + j];
    const scalar_t o = gates[3 * H + j];
    const scalar_t dh = grad_h[j] + grad_output[j];
    const scalar_t tanh_c = gate_tanh(c_next[j]);
    const scalar_t dc = grad_c[j] + dh * o * (scalar_t(1) - tanh_c * tanh_c);
    grad_c_prev[j] = dc * f;
    grad_gates[j] = dc * g * i * (scalar_t(1) - i);
    grad_gates[H + j] = dc * c_prev[j] * f * (scalar_t(1) - f);
    grad_gates[2 * H + j] = dc * i * (scalar_t(1) - g * g);
    grad_gates[3 * H + j] = dh * tanh_c * o * (scalar_t(1) - o);
  }
}
// gates (4H): W_ih x in its first 3H on entry; r, z, n and W_hn h + b_hn on exit.
// Writes h' to h_next.
template <typename scalar_t>
inline void gru_row_forward(scalar_t* __restrict gates, const scalar_t* __restrict hidden_gates,
                            const scalar_t* __restrict input_bias,
                            const scalar_t* __restrict hidden_bias, const scalar_t* __restrict h,
                            int64_t H, int64_t count, scalar_t* __restrict h_next) {
  for (int64_t j = 0; j < count; ++j) {
    auto input_part = [=](int64_t k) { return gates[k * H + j] + input_bias[k * H + j]; };
    auto hidden_part = [=](int64_t k) { return hidden_gates[k * H + j] + hidden_bias[k * H + j]; };
    const scalar_t r = gate_sigmoid(input_part(0) + hidden_part(0));
    const scalar_t z = gate_sigmoid(input_part(1) + hidden_part(1));
    const scalar_t hidden_n = hidden_part(2);
    const scalar_t n = gate_tanh(input_part(2) + r * hidden_n);
    gates[j] = r;
    gates[H + j] = z;
    gates[2 * H + j] = n;
    gates[3 * H + j] = hidden_n;
    h_next[j] = (scalar_t(1) - z) * n + z * h[j];
  }
}
// grad_h + grad_output: the gradient reaching h'.  Writes the gradients of the input
// pre-activations (W_i* x + b_i*) and of the hidden ones (W_h* h + b_h*) -- they differ
// in the n gate -- and the direct part dh' * z of the gradient of h.
template <typename scalar_t>
inline void gru_row_backward(const scalar_t* __restrict grad_h,
                             const scalar_t* __restrict grad_output,
                             const scalar_t* __restrict saved, const scalar_t* __restrict h,
                             int64_t H, int64_t count, scalar_t* __restrict grad_input_gates,
                             scalar_t* __restrict grad_hidden_gates,
                             scalar_t* __restrict grad_h_direct) {
  for (int64_t j = 0; j < count; ++j) {
    const scalar_t r = saved[j];
    const scalar_t z = saved[H + j];
    const scalar_t n = saved[2 * H + j];
    const scalar_t hidden_n = saved[3 * H + j];
    const scalar_t dh = grad_h[j] + grad_output[j];
    const scalar_t d_pre_n = dh * (scalar_t(1) - z) * (scalar_t(1) - n * n);
    const scalar_t d_pre_z = dh * (h[j] - n) * z * (scalar_t(1) - z);
    const scalar_t d_pre_r = d_pre_n * hidden_n * r * (scalar_t(1) - r);
    grad_input_gates[j] = d_pre_r;
    grad_input_gates[H + j] = d_pre_z;
    grad_input_gates[2 * H + j] = d_pre_n;
    grad_hidden_gates[j] = d_pre_r;
    grad_hidden_gates[H + j] = d_pre_z;
    grad_hidden_gates[2 * H + j] = d_pre_n * r;
    grad_h_direct[j] = dh * z;
  }
}
// The row functions as the cells call them (one call per batch row): the baseline
// instantiation, or for float32 a clone for the CPU's widest ISA (IsaClones,
// csrc/cpu/isa.h).  The layers get their clones through the step functions.
// kBaseline, or where it is kFloat (the float32 instantiation) its clone for this CPU.
template <auto kBaseline, auto kFloat>
auto float32_clone_or_baseline() {
  if constexpr (std::is_same_v<decltype(kBaseline), decltype(kFloat)>) {
    return IsaClones<kFloat>::for_this_cpu();
  } else {
    return kBaseline;
  }
}
#define FASTATTN_ROW_KERNEL(name) (float32_clone_or_baseline<&name<scalar_t>, &name<float>>())

// A bias, or zeros when there is none: the fused loops always add both biases.
at::Tensor bias_or_zeros(const at::Tensor& bias, int64_t gate_rows,
                         const at::TensorOptions& options) {
  return bias.defined() ? bias : at::zeros({gate_rows}, options);
}

// ---------------------------------------------------------------------------------
// Cells.  float16 / bfloat16 cells run their gate maths in float32, on float32 copies of
// the GEMMs' outputs and of the (B, H) states, and save their inputs as given.  bfloat16
// GEMMs run in bfloat16 (ATen's kernels accumulate in float32 and round the result, as
// torch.nn.LSTMCell's do): a decoder that steps a cell then never copies its weights
// (float32 copies made a bfloat16 LSTMCell step at B = 32, H = 256 2.4x slower on this
// project's AMD EPYC, 853 us against 353, torch's own 424).  float16 GEMMs run on float32
// copies of their operands: a CPU without float16 arithmetic (this one) ran the float16
// GEMM 2.6x slower than the copies and a float32 GEMM.

// The dtype the gate maths run in: float32 for float16 / bfloat16 inputs.
at::ScalarType gate_math_type(const at::Tensor& x) {
  return is_low_precision(x.scalar_type()) ? at::kFloat : x.scalar_type();
}

// The dtype a cell's GEMMs run in (see above).
at::ScalarType gemm_type(const at::Tensor& x) {
  return x.scalar_type() == at::kHalf ? at::kFloat : x.scalar_type();
}

// a @ b in gemm_type(reference), returned in the reference's dtype (small float32 and
// float64 products: small_matmul_into, csrc/cpu/tile_gemm.h).
at::Tensor cell_gemm(const at::Tensor& reference, const at::Tensor& a, const at::Tensor& b) {
  const at::ScalarType type = gemm_type(reference);
  if (a.scalar_type() == type && b.scalar_type() == type) {
    at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
    if (small_matmul_into(out, a, b, /*accumulate=*/false)) return out.to(reference.scalar_type());
  }
  return at::mm(a.to(type), b.to(type)).to(reference.scalar_type());
}

// The gate pre-activations' projections of a cell in the gate maths' dtype: `gates`
// (rows, G) receives x @ w_ih^T, the result is h @ w_hh^T.
at::Tensor cell_projections_into(at::Tensor gates, const at::Tensor& x, const at::Tensor& h,
                                 const at::Tensor& w_ih, const at::Tensor& w_hh) {
  const at::ScalarType type = gemm_type(x);
  if (gates.scalar_type() == type) {  // float32 / float64, or float16 on float32 copies
    input_projection_into(gates, x.to(type), w_ih.to(type));
    return hidden_projection(h.to(type), w_hh.to(type));
  }
  gates.copy_(hidden_projection(x, w_ih));
  return hidden_projection(h, w_hh).to(gates.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_forward(
    const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& c_in,
    const at::Tensor& w_ih_in, const at::Tensor& w_hh_in, const std::optional<at::Tensor>& b_ih_in,
    const std::optional<at::Tensor>& b_hh_in) {
  constexpr const char* op = "lstm_cell_forward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // inner ATen calls record no graph
  check_floating_cpu(op, x_in, "x");
  check_dim(op, x_in, 2, "x");
  check_dim(op, h_in, 2, "h");
  check_dim(op, c_in, 2, "c");
  check_same_dtype(op, x_in, h_in, "h");
  check_same_dtype(op, x_in, c_in, "c");
  const int64_t B = x_in.size(0), I = x_in.size(1), H = c_in.size(1), hidden_in = h_in.size(1);
  check_shape(op, h_in, {B, hidden_in}, "h");
  check_shape(op, c_in, {B, H}, "c");
  check_weights(op, x_in, w_ih_in, w_hh_in, b_ih_in, b_hh_in, kLstmGates * H, I, hidden_in);

  const at::ScalarType math_type = gate_math_type(x_in);
  const auto math = x_in.options().dtype(math_type);
  const at::Tensor c = c_in.contiguous().to(math_type);
  const at::Tensor b_ih = contiguous_or_undefined(b_ih_in), b_hh = contiguous_or_undefined(b_hh_in);
  const int64_t G = kLstmGates * H;
  const at::Tensor input_bias = bias_or_zeros(b_ih, G, math).to(math_type);
  const at::Tensor hidden_bias = bias_or_zeros(b_hh, G, math).to(math_type);
  at::Tensor h_next = at::empty({B, H}, math);
  at::Tensor c_next = at::empty({B, H}, math);
  at::Tensor saved = at::empty({B, G}, math);
  const at::Tensor hidden_gates = cell_projections_into(saved, x_in, h_in, w_ih_in, w_hh_in);

  AT_DISPATCH_FLOATING_TYPES(math_type, op, [&] {
    const scalar_t* hidden_data = hidden_gates.const_data_ptr<scalar_t>();
    const scalar_t* input_bias_data = input_bias.const_data_ptr<scalar_t>();
    const scalar_t* hidden_bias_data = hidden_bias.const_data_ptr<scalar_t>();
    const scalar_t* c_data = c.const_data_ptr<scalar_t>();
    scalar_t* saved_data = saved.mutable_data_ptr<scalar_t>();
    scalar_t* c_next_data = c_next.mutable_data_ptr<scalar_t>();
    scalar_t* h_next_data = h_next.mutable_data_ptr<scalar_t>();
    const auto row_forward = FASTATTN_ROW_KERNEL(lstm_row_forward);
    at::parallel_for(0, B, rows_per_task(G), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        row_forward(saved_data + b * G, hidden_data + b * G, input_bias_data,
                         hidden_bias_data, c_data + b * H, H, H, c_next_data + b * H,
                         h_next_data + b * H);
      }
    });
  });
  const auto dtype = x_in.scalar_type();
  return {h_next.to(dtype), c_next.to(dtype), saved.to(dtype)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_cell_backward(const at::Tensor& grad_h_next_in, const at::Tensor& grad_c_next_in,
                   const at::Tensor& x_in, const at::Tensor& h_in, const at::Tensor& c_in,
                   const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
                   const std::optional<at::Tensor>& b_ih_in,
                   const std::optional<at::Tensor>& b_hh_in, const at::Tensor& c_next_in,
                   const at::Tensor& saved_in) {
  constexpr const char* op = "lstm_cell_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // inner ATen calls record no graph
  check_floating_cpu(op, x_in, "x");
  check_dim(op, x_in, 2, "x");
  check_dim(op, h_in, 2, "h");
  check_dim(op, c_in, 2, "c");
  const int64_t B = x_in.size(0), I = x_in.size(1), H = c_in.size(1), hidden_in = h_in.size(1);
  const int64_t G = kLstmGates * H;
  const std::pair<const at::Tensor*, const char*> same_dtype[] = {
      {&h_in, "h"}, {&c_in, "c"}, {&grad_h_next_in, "grad_h_next"},
      {&grad_c_next_in, "grad_c_next"}, {&c_next_in, "c_next"}, {&saved_in, "saved"}};
  for (const auto& [tensor, name] : same_dtype) {
    check_same_dtype(op, x_in, *tensor, name);
  }
  check_shape(op, h_in, {B, hidden_in}, "h");
  check_shape(op, c_in, {B, H}, "c");
  check_shape(op, grad_h_next_in, {B, H}, "grad_h_next");
  check_shape(op, grad_c_next_in, {B, H}, "grad_c_next");
  check_shape(op, c_next_in, {B, H}, "c_next");
  check_shape(op, saved_in, {B, G}, "saved");
  check_weights(op, x_in, w_ih_in, w_hh_in, b_ih_in, b_hh_in, G, I, hidden_in);

  const at::ScalarType math_type = gate_math_type(x_in);
  const auto math = x_in.options().dtype(math_type);
  const at::Tensor grad_h_next = grad_h_next_in.contiguous().to(math_type);
  const at::Tensor grad_c_next = grad_c_next_in.contiguous().to(math_type);
  const at::Tensor c = c_in.contiguous().to(math_type), c_next = c_next_in.contiguous().to(math_type);
  const at::Tensor saved = saved_in.contiguous().to(math_type);
  const at::Tensor no_output_grad = at::zeros({B, H}, math);
  at::Tensor grad_gates = at::empty({B, G}, math);
  at::Tensor grad_c = at::empty({B, H}, math);

  AT_DISPATCH_FLOATING_TYPES(math_type, op, [&] {
    const scalar_t* grad_h_data = grad_h_next.const_data_ptr<scalar_t>();
    const scalar_t* zeros_data = no_output_grad.const_data_ptr<scalar_t>();
    const scalar_t* grad_c_data = grad_c_next.const_data_ptr<scalar_t>();
    const scalar_t* saved_data = saved.const_data_ptr<scalar_t>();
    const scalar_t* c_data = c.const_data_ptr<scalar_t>();
    const scalar_t* c_next_data = c_next.const_data_ptr<scalar_t>();
    scalar_t* grad_gates_data = grad_gates.mutable_data_ptr<scalar_t>();
    scalar_t* grad_c_out = grad_c.mutable_data_ptr<scalar_t>();
    const auto row_backward = FASTATTN_ROW_KERNEL(lstm_row_backward);
    at::parallel_for(0, B, rows_per_task(G), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        row_backward(grad_h_data + b * H, zeros_data + b * H, grad_c_data + b * H,
                                    saved_data + b * G, c_data + b * H, c_next_data + b * H, H,
                                    H, grad_gates_data + b * G, grad_c_out + b * H);
      }
    });
  });
  const at::Tensor b_ih = contiguous_or_undefined(b_ih_in), b_hh = contiguous_or_undefined(b_hh_in);
  // 16-bit: the gate gradients rounded to the inputs' dtype, as the reference's are.
  const at::Tensor rounded = grad_gates.to(x_in.scalar_type());
  return {cell_gemm(x_in, rounded, w_ih_in),     cell_gemm(x_in, rounded, w_hh_in),
          grad_c.to(x_in.scalar_type()),         cell_gemm(x_in, rounded.t(), x_in),
          cell_gemm(x_in, rounded.t(), h_in),    bias_grad(b_ih, grad_gates),
          bias_grad(b_hh, grad_gates)};
}

std::tuple<at::Tensor, at::Tensor> gru_cell_forward(const at::Tensor& x_in, const at::Tensor& h_in,
                                                    const at::Tensor& w_ih_in,
                                                    const at::Tensor& w_hh_in,
                                                    const std::optional<at::Tensor>& b_ih_in,
                                                    const std::optional<at::Tensor>& b_hh_in) {
  constexpr const char* op = "gru_cell_forward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // inner ATen calls record no graph
  check_floating_cpu(op, x_in, "x");
  check_dim(op, x_in, 2, "x");
  check_dim(op, h_in, 2, "h");
  check_same_dtype(op, x_in, h_in, "h");
  const int64_t B = x_in.size(0), I = x_in.size(1), H = h_in.size(1);
  const int64_t G = kGruGates * H;
  check_shape(op, h_in, {B, H}, "h");
  check_weights(op, x_in, w_ih_in, w_hh_in, b_ih_in, b_hh_in, G, I, H);

  const at::ScalarType math_type = gate_math_type(x_in);
  const auto math = x_in.options().dtype(math_type);
  const at::Tensor h = h_in.contiguous();
  const at::Tensor b_ih = contiguous_or_undefined(b_ih_in), b_hh = contiguous_or_undefined(b_hh_in);
  const at::Tensor input_bias = bias_or_zeros(b_ih, G, math).to(math_type);
  const at::Tensor hidden_bias = bias_or_zeros(b_hh, G, math).to(math_type);
  at::Tensor h_next = at::empty({B, H}, math);
  at::Tensor saved = at::empty({B, 4 * H}, math);
  const at::Tensor hidden_gates = cell_projections_into(saved.narrow(1, 0, G), x_in, h, w_ih_in, w_hh_in);
  const at::Tensor h_math = h.to(math_type);

  AT_DISPATCH_FLOATING_TYPES(math_type, op, [&] {
    const scalar_t* hidden_data = hidden_gates.const_data_ptr<scalar_t>();
    const scalar_t* input_bias_data = input_bias.const_data_ptr<scalar_t>();
    const scalar_t* hidden_bias_data = hidden_bias.const_data_ptr<scalar_t>();
    const scalar_t* h_data = h_math.const_data_ptr<scalar_t>();
    scalar_t* saved_data = saved.mutable_data_ptr<scalar_t>();
    scalar_t* h_next_data = h_next.mutable_data_ptr<scalar_t>();
    const auto row_forward = FASTATTN_ROW_KERNEL(gru_row_forward);
    at::parallel_for(0, B, rows_per_task(G), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        row_forward(saved_data + b * 4 * H, hidden_data + b * G, input_bias_data,
                        hidden_bias_data, h_data + b * H, H, H, h_next_data + b * H);
      }
    });
  });
  return {h_next.to(x_in.scalar_type()), saved.to(x_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_cell_backward(const at::Tensor& grad_h_next_in, const at::Tensor& x_in, const at::Tensor& h_in,
                  const at::Tensor& w_ih_in, const at::Tensor& w_hh_in,
                  const std::optional<at::Tensor>& b_ih_in,
                  const std::optional<at::Tensor>& b_hh_in, const at::Tensor& saved_in) {
  constexpr const char* op = "gru_cell_backward";
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // inner ATen calls record no graph
  check_floating_cpu(op, x_in, "x");
  check_dim(op, x_in, 2, "x");
  check_dim(op, h_in, 2, "h");
  check_same_dtype(op, x_in, h_in, "h");
  check_same_dtype(op, x_in, grad_h_next_in, "grad_h_next");
  check_same_dtype(op, x_in, saved_in, "saved");
  const int64_t B = x_in.size(0), I = x_in.size(1), H = h_in.size(1);
  const int64_t G = kGruGates * H;
  check_shape(op, h_in, {B, H}, "h");
  check_shape(op, grad_h_next_in, {B, H}, "grad_h_next");
  check_shape(op, saved_in, {B, 4 * H}, "saved");
  check_weights(op, x_in, w_ih_in, w_hh_in, b_ih_in, b_hh_in, G, I, H);

  const at::ScalarType math_type = gate_math_type(x_in);
  const auto math = x_in.options().dtype(math_type);
  const at::Tensor grad_h_next = grad_h_next_in.contiguous().to(math_type);
  const at::Tensor h = h_in.contiguous(), saved = saved_in.contiguous().to(math_type);
  const at::Tensor h_math = h.to(math_type);
  const at::Tensor no_output_grad = at::zeros({B, H}, math);
  at::Tensor grad_input_gates = at::empty({B, G}, math);
  at::Tensor grad_hidden_gates = at::empty({B, G}, math);
  at::Tensor grad_h = at::empty({B, H}, math);

  AT_DISPATCH_FLOATING_TYPES(math_type, op, [&] {
    const scalar_t* grad_h_next_data = grad_h_next.const_data_ptr<scalar_t>();
    const scalar_t* zeros_data = no_output_grad.const_data_ptr<scalar_t>();
    const scalar_t* saved_data = saved.const_data_ptr<scalar_t>();
    const scalar_t* h_data = h_math.const_data_ptr<scalar_t>();
    scalar_t* grad_input_data = grad_input_gates.mutable_data_ptr<scalar_t>();
    scalar_t* grad_hidden_data = grad_hidden_gates.mutable_data_ptr<scalar_t>();
    scalar_t* grad_h_data = grad_h.mutable_data_ptr<scalar_t>();
    const auto row_backward = FASTATTN_ROW_KERNEL(gru_row_backward);
    at::parallel_for(0, B, rows_per_task(G), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        row_backward(grad_h_next_data + b * H, zeros_data + b * H,
                                   saved_data + b * 4 * H, h_data + b * H, H, H,
                                   grad_input_data + b * G, grad_hidden_data + b * G,
                                   grad_h_data + b * H);
      }
    });
  });
  const auto dtype = x_in.scalar_type();
  // 16-bit: the gate gradients rounded to the inputs' dtype, as the reference's are.
  const at::Tensor rounded_input = grad_input_gates.to(dtype), rounded_hidden = grad_hidden_gates.to(dtype);
  // The direct part dh' * z plus the path through the gates.
  if (dtype == math_type) {
    if (!small_matmul_into(grad_h, grad_hidden_gates, w_hh_in, /*accumulate=*/true)) {
      grad_h.addmm_(grad_hidden_gates, w_hh_in);
    }
  } else {
    grad_h.add_(cell_gemm(x_in, rounded_hidden, w_hh_in));
  }
  const at::Tensor b_ih = contiguous_or_undefined(b_ih_in), b_hh = contiguous_or_undefined(b_hh_in);
  return {cell_gemm(x_in, rounded_input, w_ih_in),  grad_h.to(dtype),
          cell_gemm(x_in, rounded_input.t(), x_in), cell_gemm(x_in, rounded_hidden.t(), h),
          bias_grad(b_ih, grad_input_gates),        bias_grad(b_hh, grad_hidden_gates)};
}

// ---------------------------------------------------------------------------------
// Layers.  Sequence b is active at time t when t < lengths[b] (always without lengths);
// inactive steps keep the state, output 0 and pass the state gradient through.  saved
// at an inactive step holds zero gates and, for the LSTM, the frozen cell state, so the
// previous step's saved c is always the c the backward needs.  The hidden state a step
// started from is rebuilt from output and h0 in the backward (previous_hidden).

// Checks x (T, B, I), the states (B, H) and the weights; H comes from w_hh (G*H, H).
LayerShape check_layer(const char* op, const at::Tensor& x, const at::Tensor& h0,
                       const at::Tensor* c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                       const std::optional<at::Tensor>& b_ih,
                       const std::optional<at::Tensor>& b_hh, int64_t gates) {
  check_floating_cpu(op, x, "x");
  check_dim(op, x, 3, "x");
  const int64_t H = hidden_size_of(op, w_hh, gates);
  const LayerShape shape{x.size(0), x.size(1), x.size(2), H};
  check_same_dtype(op, x, h0, "h0");
  check_shape(op, h0, {shape.B, H}, "h0");
  if (c0 != nullptr) {
    check_same_dtype(op, x, *c0, "c0");
    check_shape(op, *c0, {shape.B, H}, "c0");
  }
  check_weights(op, x, w_ih, w_hh, b_ih, b_hh, gates * H, shape.I, H);
  return shape;
}

// Per-sequence number of active steps, clamped to [0, T]: t is active iff t < active[b].
std::vector<int64_t> active_lengths(const at::Tensor& lengths, const LayerShape& shape) {
  std::vector<int64_t> active(shape.B, shape.T);
  if (lengths.defined()) {
    const int64_t* data = lengths.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < shape.B; ++b) {
      active[b] = std::clamp<int64_t>(data[b], 0, shape.T);
    }
  }
  return active;
}

// The per-cell policies of the layer drivers below (layer_forward, layer_backward):
// the gate count, the width of a saved row, whether there is a cell state, and the
// fused functions of one step for `count` hidden units.  Every pointer they get is
// already offset to the first unit of the range (see the row functions above).
struct LstmLayerCell {
  static constexpr const char* kForwardOp = "lstm_layer_forward";
  static constexpr const char* kBackwardOp = "lstm_layer_backward";
  static constexpr int64_t kGates = kLstmGates;
  static constexpr bool kHasCellState = true;       // c, saved after the gates
  static constexpr bool kSeparateHiddenGrad = false;  // one gate gradient for both GEMMs
  static int64_t saved_width(int64_t H) { return kLstmGates * H + H; }  // gates | c'

  // Active step: gates and c' go to saved, h' to output and to the next state.
  template <typename scalar_t>
  static void forward_step(scalar_t* saved_row, const scalar_t* hidden_row,
                           const scalar_t* input_bias, const scalar_t* hidden_bias,
                           const scalar_t* /*h_row*/, scalar_t* c_row, int64_t H, int64_t count,
                           scalar_t* output_row, scalar_t* h_next_row) {
    scalar_t* saved_c_row = saved_row + kLstmGates * H;
    lstm_row_forward(saved_row, hidden_row, input_bias, hidden_bias, c_row, H, count, saved_c_row,
                     output_row);
    std::copy(output_row, output_row + count, h_next_row);
    std::copy(saved_c_row, saved_c_row + count, c_row);
  }
  // Frozen step: gates 0 and the kept cell state.
  template <typename scalar_t>
  static void freeze(scalar_t* saved_row, const scalar_t* c_row, int64_t H, int64_t count) {
    for (int64_t k = 0; k < kLstmGates; ++k) {
      std::fill(saved_row + k * H, saved_row + k * H + count, scalar_t(0));
    }
    std::copy(c_row, c_row + count, saved_row + kLstmGates * H);
  }
  // grad_h of a sequence after an active step: the path through the gates.
  template <typename scalar_t>
  static void take_recurrent_grad(const scalar_t* recurrent, const scalar_t* /*scratch*/,
                                  int64_t count, scalar_t* grad_h) {
    std::copy(recurrent, recurrent + count, grad_h);
  }
  // scratch receives the gradient of c_prev, which then becomes grad_c.
  template <typename scalar_t>
  static void backward_step(const scalar_t* grad_h, const scalar_t* grad_output,
                            const scalar_t* saved_row, const scalar_t* c_prev,
                            const scalar_t* /*previous_row*/, int64_t H, int64_t count,
                            scalar_t* grad_c, scalar_t* scratch, scalar_t* grad_gates,
                            scalar_t* /*unused*/) {
    lstm_row_backward(grad_h, grad_output, grad_c, saved_row, c_prev, saved_row + kLstmGates * H,
                      H, count, grad_gates, scratch);
    std::copy(scratch, scratch + count, grad_c);
  }
};

struct GruLayerCell {
  static constexpr const char* kForwardOp = "gru_layer_forward";
  static constexpr const char* kBackwardOp = "gru_layer_backward";
  static constexpr int64_t kGates = kGruGates;
  static constexpr bool kHasCellState = false;
  static constexpr bool kSeparateHiddenGrad = true;  // the n gate differs
  static int64_t saved_width(int64_t H) { return 4 * H; }  // r, z, n, W_hn h + b_hn

  template <typename scalar_t>
  static void forward_step(scalar_t* saved_row, const scalar_t* hidden_row,
                           const scalar_t* input_bias, const scalar_t* hidden_bias,
                           const scalar_t* h_row, scalar_t* /*c_row*/, int64_t H, int64_t count,
                           scalar_t* output_row, scalar_t* h_next_row) {
    gru_row_forward(saved_row, hidden_row, input_bias, hidden_bias, h_row, H, count, output_row);
    std::copy(output_row, output_row + count, h_next_row);
  }
  template <typename scalar_t>
  static void freeze(scalar_t* saved_row, const scalar_t* /*c_row*/, int64_t H, int64_t count) {
    for (int64_t k = 0; k < 4; ++k) {
      std::fill(saved_row + k * H, saved_row + k * H + count, scalar_t(0));
    }
  }
  // The direct part dh' * z (in scratch) plus the path through the gates.
  template <typename scalar_t>
  static void take_recurrent_grad(const scalar_t* recurrent, const scalar_t* scratch,
                                  int64_t count, scalar_t* grad_h) {
    for (int64_t j = 0; j < count; ++j) {
      grad_h[j] = scratch[j] + recurrent[j];
    }
  }
  // scratch receives the direct part dh' * z of the gradient of h.
  template <typename scalar_t>
  static void backward_step(const scalar_t* grad_h, const scalar_t* grad_output,
                            const scalar_t* saved_row, const scalar_t* /*c_prev*/,
                            const scalar_t* previous_row, int64_t H, int64_t count,
                            scalar_t* /*grad_c*/, scalar_t* scratch,
                            scalar_t* grad_input_gates, scalar_t* grad_hidden_gates) {
    gru_row_backward(grad_h, grad_output, saved_row, previous_row, H, count, grad_input_gates,
                     grad_hidden_gates, scratch);
  }
};

// ---------------------------------------------------------------------------------
// Time steps.  A step is split over the threads by hidden units: each task multiplies
// the state by the gate columns of its units (tile_matmul, csrc/cpu/tile_gemm.h) and
// applies the gate maths to them, so one parallel region covers the GEMM and the
// pointwise part of a step, and every element a task writes is read by the same task
// until the region ends.  The state is double-buffered (the GEMM of every task reads
// all of h_{t-1} while tasks write their units of h_t).

constexpr int64_t kHiddenBlock = 16;  // hidden units per block; a task takes whole blocks
// Multiply-adds of a step worth one task (a few microseconds of one core): a smaller
// step runs on the calling thread, since waking the others costs more than it saves
// (measured on this project's 2-core machine, LSTM layer at B=32, H=32: 12-16 us a step
// split over 2 threads, 10-13 on one).
constexpr int64_t kStepWorkPerTask = int64_t{1} << 18;

// Runs units(j0, count) over contiguous ranges of hidden units, in parallel when there
// is enough work; work_per_unit: the multiply-adds of one hidden unit (B * G: its gate
// columns times the state forward, the gate gradients times its rows of w_hh backward).
template <typename Units>
void parallel_over_units(int64_t H, int64_t work_per_unit, const Units& units) {
  const int64_t blocks = (H + kHiddenBlock - 1) / kHiddenBlock;
  const int64_t work_per_block = std::max<int64_t>(1, work_per_unit * kHiddenBlock);
  const int64_t grain = std::max<int64_t>(1, (kStepWorkPerTask + work_per_block - 1) / work_per_block);
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    const int64_t j0 = begin * kHiddenBlock;
    units(j0, std::min(end * kHiddenBlock, H) - j0);
  });
}

// What one forward step reads and writes (t: its time index).
template <typename scalar_t>
struct ForwardStep {
  int64_t B, H, G, saved_width, t;
  const int64_t* active;       // (B,) active steps per sequence
  const scalar_t* w_hh_t;      // (H, G): w_hh transposed, rows w_hh_t_stride apart
  int64_t w_hh_t_stride;
  TileEngine engine;           // of the float tiles (layer_tile_engine)
  const scalar_t* input_bias;  // (G,)
  const scalar_t* hidden_bias;
  const scalar_t* h_prev;      // (B, H) state before the step
  scalar_t* h_next;            // (B, H) state after it
  scalar_t* c;                 // (B, H) cell state, updated in place (LSTM)
  scalar_t* hidden_gates;      // (B, G) h_prev @ w_hh^T
  scalar_t* saved;             // (T, B, saved_width)
  scalar_t* output;            // (T, B, H)
  // bfloat16 GEMMs (a bfloat16 layer on AVX512-BF16; null otherwise): w_hh packed for
  // bfloat16_gemm::gemm gate by gate (packed_gate_elements apart, w_hh_t unused), and the
  // states rounded to bfloat16 as the GEMM's A, double-buffered as h is.
  const uint16_t* packed_w_hh;
  int64_t packed_gate_elements;
  const uint16_t* h_prev_bfloat16;
  uint16_t* h_next_bfloat16;
};

// The gate maths of a forward step for units [j0, j0 + count), hidden_gates holding their
// columns of h_prev @ w_hh^T.
template <typename Cell, typename scalar_t>
inline void forward_update(const ForwardStep<scalar_t>& step, int64_t j0, int64_t count) {
  const int64_t B = step.B, H = step.H, G = step.G;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t row = step.t * B + b;
    scalar_t* saved_row = step.saved + row * step.saved_width + j0;
    scalar_t* output_row = step.output + row * H + j0;
    const scalar_t* h_row = step.h_prev + b * H + j0;
    scalar_t* h_next_row = step.h_next + b * H + j0;
    scalar_t* c_row = Cell::kHasCellState ? step.c + b * H + j0 : nullptr;
    if (step.t < step.active[b]) {
      Cell::forward_step(saved_row, step.hidden_gates + b * G + j0, step.input_bias + j0,
                         step.hidden_bias + j0, h_row, c_row, H, count, output_row, h_next_row);
    } else {  // frozen: the state kept, output 0
      Cell::freeze(saved_row, static_cast<const scalar_t*>(c_row), H, count);
      std::copy(h_row, h_row + count, h_next_row);
      std::fill(output_row, output_row + count, scalar_t(0));
    }
  }
}

template <typename Cell, typename scalar_t>
inline void forward_units(const ForwardStep<scalar_t>& step, int64_t j0, int64_t count) {
  const int64_t B = step.B, H = step.H, G = step.G;
  for (int64_t k = 0; k < Cell::kGates; ++k) {
    tile_matmul(B, count, H, step.h_prev, H, step.w_hh_t + k * H + j0, step.w_hh_t_stride,
                step.hidden_gates + k * H + j0, G, step.engine);
  }
  forward_update<Cell, scalar_t>(step, j0, count);
}

// What one backward step reads and writes.  t < 0: no step of its own (the last call
// only takes the recurrent gradient of the first step); t_next < 0: no later step.
template <typename scalar_t>
struct BackwardStep {
  int64_t B, H, G, saved_width, t, t_prev, t_next;
  const int64_t* active;
  const scalar_t* w_hh;           // (G, H), rows w_hh_stride apart
  int64_t w_hh_stride;
  TileEngine engine;              // of the float tiles (layer_tile_engine)
  const scalar_t* grad_output;    // (T, B, H)
  const scalar_t* output;         // (T, B, H)
  const scalar_t* saved;          // (T, B, saved_width)
  const scalar_t* h0;             // (B, H)
  const scalar_t* c0;             // (B, H) (LSTM)
  scalar_t* grad_h;               // (B, H) gradient of the state, walked back
  scalar_t* grad_c;               // (B, H) (LSTM)
  scalar_t* scratch;              // (B, H) per unit: see Cell::backward_step
  scalar_t* grad_h_recurrent;     // (B, H) grad_hidden_gates[t_next] @ w_hh
  scalar_t* grad_input_gates;     // (T, B, G)
  scalar_t* grad_hidden_gates;    // (T, B, G), grad_input_gates when shared
  scalar_t* previous_hidden;      // (T, B, H) the state each step started from
  // bfloat16 GEMMs (a bfloat16 layer on AVX512-BF16; null otherwise): w_hh^T packed for
  // bfloat16_gemm::gemm (w_hh unused), and the hidden gates' gradients rounded to bfloat16
  // (T, B, G): the A of the step before, and after the time loop of grad_w_hh's GEMM.
  const uint16_t* packed_w_hh_t;
  uint16_t* rounded_hidden_gates;
};

// grad_h after step t_next for units [j0, j0 + count), grad_h_recurrent holding their
// columns of that step's hidden-gate gradients @ w_hh.
template <typename Cell, typename scalar_t>
inline void take_recurrent_grads(const BackwardStep<scalar_t>& step, int64_t j0, int64_t count) {
  const int64_t H = step.H;
  for (int64_t b = 0; b < step.B; ++b) {
    if (step.t_next < step.active[b]) {
      Cell::take_recurrent_grad(static_cast<const scalar_t*>(step.grad_h_recurrent + b * H + j0),
                                static_cast<const scalar_t*>(step.scratch + b * H + j0), count,
                                step.grad_h + b * H + j0);
    }
  }
}

// The gate gradients of step t (t >= 0) for units [j0, j0 + count).
template <typename Cell, typename scalar_t>
inline void backward_gates(const BackwardStep<scalar_t>& step, int64_t j0, int64_t count) {
  const int64_t B = step.B, H = step.H, G = step.G;
  const int64_t t = step.t;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t row = t * B + b;
    scalar_t* grad_input_row = step.grad_input_gates + row * G + j0;
    scalar_t* grad_hidden_row = step.grad_hidden_gates + row * G + j0;
    scalar_t* previous_row = step.previous_hidden + row * H + j0;
    if (t < step.active[b]) {
      // The state the step started from: the previous step's output when that step
      // was active, else h0 (inactive steps only come before the active ones of a
      // reversed layer, and keep h0).
      const bool previous_active = step.t_prev >= 0 && step.t_prev < step.active[b];
      const scalar_t* h_prev = previous_active ? step.output + (step.t_prev * B + b) * H
                                               : step.h0 + b * H;
      std::copy(h_prev + j0, h_prev + j0 + count, previous_row);
      // c_{t-1}: the cell state saved at the previous step (frozen steps save it too).
      const scalar_t* c_prev = nullptr;
      if (Cell::kHasCellState) {
        c_prev = (step.t_prev >= 0 ? step.saved + (step.t_prev * B + b) * step.saved_width +
                                         Cell::kGates * H
                                   : step.c0 + b * H) +
                 j0;
      }
      Cell::backward_step(static_cast<const scalar_t*>(step.grad_h + b * H + j0),
                          step.grad_output + row * H + j0,
                          step.saved + row * step.saved_width + j0, c_prev,
                          static_cast<const scalar_t*>(previous_row), H, count,
                          Cell::kHasCellState ? step.grad_c + b * H + j0 : nullptr,
                          step.scratch + b * H + j0, grad_input_row, grad_hidden_row);
    } else {
      for (int64_t k = 0; k < Cell::kGates; ++k) {
        std::fill(grad_input_row + k * H, grad_input_row + k * H + count, scalar_t(0));
        if (Cell::kSeparateHiddenGrad) {
          std::fill(grad_hidden_row + k * H, grad_hidden_row + k * H + count, scalar_t(0));
        }
      }
      std::fill(previous_row, previous_row + count, scalar_t(0));
    }
  }
}

template <typename Cell, typename scalar_t>
inline void backward_units(const BackwardStep<scalar_t>& step, int64_t j0, int64_t count) {
  const int64_t B = step.B, H = step.H, G = step.G;
  if (step.t_next >= 0) {  // grad_h after step t_next: its gate gradients through w_hh
    tile_matmul(B, count, G, step.grad_hidden_gates + step.t_next * B * G, G, step.w_hh + j0,
                step.w_hh_stride, step.grad_h_recurrent + j0, H, step.engine);
    take_recurrent_grads<Cell, scalar_t>(step, j0, count);
  }
  if (step.t >= 0) backward_gates<Cell, scalar_t>(step, j0, count);
}

// The step functions compiled for the baseline ISA, and in float32 for the CPU's widest
// ISA too (the gate maths vectorise 8 lanes wide with AVX2, 16 with AVX-512).
#define FASTATTN_STEP_KERNEL(name) (float32_clone_or_baseline<&name<Cell, scalar_t>, &name<Cell, float>>())

#ifdef FASTATTN_AVX512_BF16_CLONES
static_assert(kHiddenBlock % bfloat16_gemm::kPanel == 0, "a task's units start at a packed panel of w_hh");

// A bfloat16 layer's step on AVX512-BF16: each gate's columns of h_prev @ w_hh^T from the
// bfloat16 GEMM (csrc/cpu/bfloat16_gemm.h; h_prev rounded to bfloat16, w_hh packed once a
// call, a task's units starting at one of a gate's panels of 16 rows), float32 out; the
// gate maths in float32 as in a float32 layer; then the units' new state rounded to
// bfloat16 for the next step's GEMM.
template <typename Cell>
FASTATTN_TARGET_AVX512_BF16 FASTATTN_KERNEL void forward_units_bfloat16(const ForwardStep<float>& step, int64_t j0,
                                                                        int64_t count) {
  const int64_t B = step.B, H = step.H, G = step.G;
  const int64_t panel_offset = (j0 / bfloat16_gemm::kPanel) * bfloat16_gemm::panel_elements(H);
  for (int64_t k = 0; k < Cell::kGates; ++k) {
    bfloat16_gemm::gemm(step.h_prev_bfloat16, B, H, H, step.packed_w_hh + k * step.packed_gate_elements + panel_offset,
                        count, step.hidden_gates + k * H + j0, G);
  }
  forward_update<Cell, float>(step, j0, count);
  for (int64_t b = 0; b < B; ++b) {
    const float* h_next_row = step.h_next + b * H + j0;
    uint16_t* rounded_row = step.h_next_bfloat16 + b * H + j0;
    for (int64_t j = 0; j < count; ++j) rounded_row[j] = c10::BFloat16(h_next_row[j]).x;
  }
}

// The backward's step in the same way: the gradient reaching h from step t_next through
// w_hh from the bfloat16 GEMM (that step's hidden-gate gradients rounded to bfloat16, w_hh^T
// packed once a call, a task's units one of its panels of 16 rows), the gate gradients of
// step t in float32, then the units' columns of them rounded for the step before.
template <typename Cell>
FASTATTN_TARGET_AVX512_BF16 FASTATTN_KERNEL void backward_units_bfloat16(const BackwardStep<float>& step, int64_t j0,
                                                                         int64_t count) {
  const int64_t B = step.B, H = step.H, G = step.G;
  if (step.t_next >= 0) {
    bfloat16_gemm::gemm(step.rounded_hidden_gates + step.t_next * B * G, B, G, G,
                        step.packed_w_hh_t + (j0 / bfloat16_gemm::kPanel) * bfloat16_gemm::panel_elements(G), count,
                        step.grad_h_recurrent + j0, H);
    take_recurrent_grads<Cell, float>(step, j0, count);
  }
  if (step.t < 0) return;
  backward_gates<Cell, float>(step, j0, count);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t row = (step.t * B + b) * G + j0;
    for (int64_t k = 0; k < Cell::kGates; ++k) {
      const float* gradients = step.grad_hidden_gates + row + k * H;
      uint16_t* rounded = step.rounded_hidden_gates + row + k * H;
      for (int64_t j = 0; j < count; ++j) rounded[j] = c10::BFloat16(gradients[j]).x;
    }
  }
}

// rows (blocks * N, K) bfloat16 packed for bfloat16_gemm::gemm block by block: each block's N
// rows as panels of 16 (zeros past N), block k from k * packed_block_elements(N, K).  The
// forward packs w_hh by gate (N = H, K = H), the backward w_hh^T whole (N = H, K = G).
int64_t packed_block_elements(int64_t N, int64_t K) { return bfloat16_gemm::panels_of(N) * bfloat16_gemm::panel_elements(K); }
std::vector<uint16_t> pack_row_blocks(const at::Tensor& rows, int64_t blocks, int64_t N, int64_t K) {
  std::vector<uint16_t> packed(blocks * packed_block_elements(N, K));
  const auto* data = reinterpret_cast<const uint16_t*>(rows.const_data_ptr<at::BFloat16>());
  for (int64_t k = 0; k < blocks; ++k) {
    bfloat16_gemm::pack(data + k * N * K, N, K, K, packed.data() + k * packed_block_elements(N, K));
  }
  return packed;
}
#endif

// One time step: units(step, j0, count) over the hidden units, in parallel.
template <typename Step>
void run_step(const Step& step, void (*units)(const Step&, int64_t, int64_t)) {
  parallel_over_units(step.H, step.B * step.G, [&](int64_t j0, int64_t count) { units(step, j0, count); });
}

// ---------------------------------------------------------------------------------
// Layer drivers

// output, h_n, c_n (undefined without a cell state) and saved of one layer direction.
template <typename Cell>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward(
    const at::Tensor& x_in, const at::Tensor& h0, const at::Tensor* c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih_in,
    const std::optional<at::Tensor>& b_hh_in, const std::optional<at::Tensor>& lengths_in,
    bool reverse) {
  constexpr const char* op = Cell::kForwardOp;
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // inner ATen calls record no graph
  const LayerShape shape = check_layer(op, x_in, h0, c0, w_ih, w_hh, b_ih_in, b_hh_in, Cell::kGates);
  const int64_t T = shape.T, B = shape.B, I = shape.I, H = shape.H;
  const int64_t G = Cell::kGates * H, saved_width = Cell::saved_width(H);
  const std::vector<int64_t> active = active_lengths(lengths_as_int64(op, lengths_in, B), shape);
  const int64_t steps = shape.steps_to_run();
  // float16 / bfloat16: the buffers, the state and the gate maths in float32, the outputs
  // rounded at the end; the GEMMs in bfloat16 on x and the weights as given where the
  // bfloat16 GEMM runs, on float32 copies made once a call otherwise.
  const at::ScalarType dtype = x_in.scalar_type(), compute = gate_math_type(x_in);
  const bool bfloat16_gemms = dtype == at::kBFloat16 && bfloat16_matmul_nt_available();
  const at::TensorOptions options = x_in.options().dtype(compute);
  const auto operand = [&](const at::Tensor& t) { return (bfloat16_gemms ? t : t.to(compute)).contiguous(); };
  const at::Tensor x = operand(x_in);
  const at::Tensor b_ih = contiguous_or_undefined(b_ih_in), b_hh = contiguous_or_undefined(b_hh_in);
  const at::Tensor input_bias = bias_or_zeros(b_ih, G, options).to(compute);
  const at::Tensor hidden_bias = bias_or_zeros(b_hh, G, options).to(compute);

  at::Tensor output = at::empty({T, B, H}, options);
  at::Tensor saved = at::empty({T, B, saved_width}, options);
  // The input projection of every step at once, (T*B, I) @ w_ih^T, into the gate
  // columns of saved (b_ih is added in the fused loop).
  at::Tensor projection = saved.view({T * B, saved_width}).narrow(1, 0, G);
  // A few steps (T <= kFewSteps) multiply by the weights as they are (matmul_transposed_into,
  // a GEMM per step) rather than copy w_ih^T and w_hh^T for the tiles first, a copy the
  // steps would not win back (fastattn.nn.GRU at H=256, B=1: 73-92 against 329 us at T=1,
  // 123-126 against 356-363 at T=4; at B=32 276 against 499-533 and 812-872 against
  // 1093-1121; at T=8 the two were even, at T=16 and more the tiles won).
  constexpr int64_t kFewSteps = 4;
  const bool few_steps = T <= kFewSteps;
  const TileEngine engine = layer_tile_engine(B, H);  // of the float tiles and the projection
  if (bfloat16_gemms) {
    at::Tensor projection_batch = projection.unsqueeze(0);
    bfloat16_matmul_nt_out(projection_batch, x.view({1, T * B, I}), w_ih.contiguous().unsqueeze(0));
  } else if (few_steps) {
    matmul_transposed_into(projection, x.view({T * B, I}), operand(w_ih));
  } else {
    matmul_into(projection, x.view({T * B, I}), operand(w_ih).t(), engine);
  }
  at::Tensor states = at::empty({2, B, H}, options);  // h, double-buffered
  states[0].copy_(h0);
  at::Tensor c_state = Cell::kHasCellState ? at::empty({B, H}, options).copy_(*c0) : at::Tensor();
  at::Tensor hidden_gates = at::empty({B, G}, options);

  AT_DISPATCH_FLOATING_TYPES(compute, op, [&] {
    ForwardStep<scalar_t> step{};
    step.engine = engine;
    step.B = B;
    step.H = H;
    step.G = G;
    step.saved_width = saved_width;
    step.active = active.data();
    step.input_bias = input_bias.const_data_ptr<scalar_t>();
    step.hidden_bias = hidden_bias.const_data_ptr<scalar_t>();
    step.c = Cell::kHasCellState ? c_state.mutable_data_ptr<scalar_t>() : nullptr;
    step.hidden_gates = hidden_gates.mutable_data_ptr<scalar_t>();
    step.saved = saved.mutable_data_ptr<scalar_t>();
    step.output = output.mutable_data_ptr<scalar_t>();
    scalar_t* state_data = states.mutable_data_ptr<scalar_t>();
    at::Tensor w_hh_t;  // (H, G): the B operand of the float tiles
    auto units = FASTATTN_STEP_KERNEL(forward_units);
    at::Tensor rounded_states;  // h in bfloat16, double-buffered
    std::vector<uint16_t> packed_w_hh;
    uint16_t* rounded_data = nullptr;
    bool bfloat16_steps = false;  // whether they run (rounded_data is null for an empty batch)
#ifdef FASTATTN_AVX512_BF16_CLONES
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (bfloat16_gemms) {
        packed_w_hh = pack_row_blocks(w_hh.contiguous(), Cell::kGates, H, H);
        step.packed_w_hh = packed_w_hh.data();
        step.packed_gate_elements = packed_block_elements(H, H);
        rounded_states = at::empty({2, B, H}, x_in.options());
        rounded_states[0].copy_(h0);
        rounded_data = reinterpret_cast<uint16_t*>(rounded_states.mutable_data_ptr<at::BFloat16>());
        units = &forward_units_bfloat16<Cell>;
        bfloat16_steps = true;
      }
    }
#endif
    const at::Tensor w_hh_rows = few_steps && !bfloat16_steps ? operand(w_hh) : at::Tensor();
    if (w_hh_rows.defined()) {
      units = FASTATTN_STEP_KERNEL(forward_update);
    } else if (!bfloat16_steps) {
      w_hh_t = as_tile_operand(operand(w_hh).t());
      step.w_hh_t = w_hh_t.const_data_ptr<scalar_t>();
      step.w_hh_t_stride = w_hh_t.stride(0);
    }
    for (int64_t s = 0; s < steps; ++s) {
      step.t = time_of_step(s, T, reverse);
      step.h_prev = state_data + (s % 2) * B * H;
      step.h_next = state_data + ((s + 1) % 2) * B * H;
      if (bfloat16_steps) {
        step.h_prev_bfloat16 = rounded_data + (s % 2) * B * H;
        step.h_next_bfloat16 = rounded_data + ((s + 1) % 2) * B * H;
      }
      if (w_hh_rows.defined()) matmul_transposed_into(hidden_gates, states[s % 2], w_hh_rows);
      run_step(step, units);
    }
  });
  if (dtype != compute) {
    return {output.to(dtype), states[steps % 2].to(dtype), Cell::kHasCellState ? c_state.to(dtype) : c_state,
            saved.to(dtype)};
  }
  return {output, states[steps % 2].clone(), c_state, saved};
}

// grad_x, grad_h0, grad_c0 (undefined without a cell state), grad_w_ih, grad_w_hh,
// grad_b_ih, grad_b_hh of one layer direction.  grad_c_n and c0 are null without a
// cell state.
template <typename Cell>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_backward(const at::Tensor& grad_output_in, const at::Tensor& grad_h_n_in,
               const at::Tensor* grad_c_n_in, const at::Tensor& x_in, const at::Tensor& h0_in,
               const at::Tensor* c0_in, const at::Tensor& w_ih, const at::Tensor& w_hh,
               const std::optional<at::Tensor>& b_ih_in, const std::optional<at::Tensor>& b_hh_in,
               const std::optional<at::Tensor>& lengths_in, bool reverse,
               const at::Tensor& output_in, const at::Tensor& saved_in) {
  constexpr const char* op = Cell::kBackwardOp;
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // inner ATen calls record no graph
  const LayerShape shape =
      check_layer(op, x_in, h0_in, c0_in, w_ih, w_hh, b_ih_in, b_hh_in, Cell::kGates);
  const int64_t T = shape.T, B = shape.B, I = shape.I, H = shape.H;
  const int64_t G = Cell::kGates * H, saved_width = Cell::saved_width(H);
  std::vector<std::pair<const at::Tensor*, const char*>> same_dtype = {
      {&grad_output_in, "grad_output"}, {&grad_h_n_in, "grad_h_n"}};
  if (Cell::kHasCellState) {
    same_dtype.emplace_back(grad_c_n_in, "grad_c_n");
  }
  same_dtype.emplace_back(&output_in, "output");
  same_dtype.emplace_back(&saved_in, "saved");
  for (const auto& [tensor, name] : same_dtype) {
    check_same_dtype(op, x_in, *tensor, name);
  }
  check_shape(op, grad_output_in, {T, B, H}, "grad_output");
  check_shape(op, grad_h_n_in, {B, H}, "grad_h_n");
  if (Cell::kHasCellState) {
    check_shape(op, *grad_c_n_in, {B, H}, "grad_c_n");
  }
  check_shape(op, output_in, {T, B, H}, "output");
  check_shape(op, saved_in, {T, B, saved_width}, "saved");
  const std::vector<int64_t> active = active_lengths(lengths_as_int64(op, lengths_in, B), shape);
  const int64_t steps = shape.steps_to_run();

  // float16 / bfloat16: the time loop in float32, on float32 copies made once a call (its
  // GEMMs in bfloat16 where the bfloat16 GEMM runs: backward_units_bfloat16); the GEMMs over
  // all steps after it in gemm_type (bfloat16 on the gate gradients rounded to bfloat16);
  // every gradient returned in the input dtype.
  const at::ScalarType dtype = x_in.scalar_type(), compute = gate_math_type(x_in);
  const at::TensorOptions options = x_in.options().dtype(compute);
  const auto in_compute = [&](const at::Tensor& t) { return t.to(compute).contiguous(); };
  const auto copy_in_compute = [&](const at::Tensor& t) { return at::empty(t.sizes(), options).copy_(t); };
  const bool bfloat16_gemms = dtype == at::kBFloat16 && bfloat16_matmul_nt_available();
  const at::Tensor h0 = in_compute(h0_in);
  const at::Tensor c0 = Cell::kHasCellState ? in_compute(*c0_in) : at::Tensor();
  const at::Tensor grad_output = in_compute(grad_output_in);
  const at::Tensor output = in_compute(output_in), saved = in_compute(saved_in);
  at::Tensor grad_h = copy_in_compute(grad_h_n_in);  // gradient of the state, walked back
  at::Tensor grad_c = Cell::kHasCellState ? copy_in_compute(*grad_c_n_in) : at::Tensor();
  // Gate gradients of the input pre-activations and of the hidden ones (one buffer when
  // they are the same).
  at::Tensor grad_input_gates = at::empty({T, B, G}, options);
  at::Tensor grad_hidden_gates = Cell::kSeparateHiddenGrad ? at::empty({T, B, G}, options) : grad_input_gates;
  at::Tensor previous_hidden = at::empty({T, B, H}, options);
  at::Tensor grad_h_recurrent = at::empty({B, H}, options);
  at::Tensor scratch = at::empty({B, H}, options);
  at::Tensor rounded_hidden_gates = bfloat16_gemms ? at::empty({T, B, G}, x_in.options()) : at::Tensor();
  const TileEngine engine = layer_tile_engine(B, H);  // of the float tiles and grad_x's GEMM

  AT_DISPATCH_FLOATING_TYPES(compute, op, [&] {
    BackwardStep<scalar_t> step{};
    step.engine = engine;
    step.B = B;
    step.H = H;
    step.G = G;
    step.saved_width = saved_width;
    step.active = active.data();
    step.grad_output = grad_output.const_data_ptr<scalar_t>();
    step.output = output.const_data_ptr<scalar_t>();
    step.saved = saved.const_data_ptr<scalar_t>();
    step.h0 = h0.const_data_ptr<scalar_t>();
    step.c0 = Cell::kHasCellState ? c0.const_data_ptr<scalar_t>() : nullptr;
    step.grad_h = grad_h.mutable_data_ptr<scalar_t>();
    step.grad_c = Cell::kHasCellState ? grad_c.mutable_data_ptr<scalar_t>() : nullptr;
    step.scratch = scratch.mutable_data_ptr<scalar_t>();
    step.grad_h_recurrent = grad_h_recurrent.mutable_data_ptr<scalar_t>();
    step.grad_input_gates = grad_input_gates.mutable_data_ptr<scalar_t>();
    step.grad_hidden_gates = grad_hidden_gates.mutable_data_ptr<scalar_t>();
    step.previous_hidden = previous_hidden.mutable_data_ptr<scalar_t>();
    at::Tensor w_hh_rows;  // the B operand of the float tiles
    auto units = FASTATTN_STEP_KERNEL(backward_units);
    std::vector<uint16_t> packed_w_hh_t;
#ifdef FASTATTN_AVX512_BF16_CLONES
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (bfloat16_gemms) {
        packed_w_hh_t = pack_row_blocks(w_hh.t().contiguous(), 1, H, G);
        step.packed_w_hh_t = packed_w_hh_t.data();
        step.rounded_hidden_gates = reinterpret_cast<uint16_t*>(rounded_hidden_gates.mutable_data_ptr<at::BFloat16>());
        units = &backward_units_bfloat16<Cell>;
      }
    }
#endif
    if (step.packed_w_hh_t == nullptr) {
      w_hh_rows = as_tile_operand(w_hh.to(compute));
      step.w_hh = w_hh_rows.const_data_ptr<scalar_t>();
      step.w_hh_stride = w_hh_rows.stride(0);
    }
    // Steps s = T-1 .. 0, then s = -1, which only takes the recurrent gradient of s = 0.
    for (int64_t s = steps - 1; s >= (steps > 0 ? -1 : 0); --s) {
      step.t = s >= 0 ? time_of_step(s, T, reverse) : -1;
      step.t_prev = s > 0 ? time_of_step(s - 1, T, reverse) : -1;
      step.t_next = s < T - 1 ? time_of_step(s + 1, T, reverse) : -1;
      run_step(step, units);
    }
  });

  const at::Tensor b_ih = contiguous_or_undefined(b_ih_in), b_hh = contiguous_or_undefined(b_hh_in);
  at::Tensor grad_b_ih = bias_grad(b_ih, grad_input_gates.view({T * B, G}));
  // Shared gate gradients: grad_b_hh equals grad_b_ih, no second sum.
  at::Tensor grad_b_hh = !Cell::kSeparateHiddenGrad && b_ih.defined() && b_hh.defined()
                             ? grad_b_ih.clone()
                             : bias_grad(b_hh, grad_hidden_gates.view({T * B, G}));
  // grad_x, grad_w_ih and grad_w_hh: one GEMM each over all steps, in gemm_type.
  const at::ScalarType gemm = gemm_type(x_in);
  const auto in_gemm = [&](const at::Tensor& t) { return t.to(gemm).contiguous(); };
  const at::Tensor grad_hidden2d =
      (bfloat16_gemms ? rounded_hidden_gates : in_gemm(grad_hidden_gates)).view({T * B, G});
  const at::Tensor grad_input2d =
      Cell::kSeparateHiddenGrad ? in_gemm(grad_input_gates).view({T * B, G}) : grad_hidden2d;
  const at::Tensor x2d = in_gemm(x_in).view({T * B, I});
  at::Tensor grad_x = at::empty({T, B, I}, x2d.options());
  matmul_into(grad_x.view({T * B, I}), grad_input2d, w_ih.to(gemm), engine);
  const auto in_dtype = [&](const at::Tensor& t) { return t.defined() ? t.to(dtype) : t; };
  return {in_dtype(grad_x),
          in_dtype(grad_h),
          in_dtype(grad_c),
          in_dtype(at::mm(grad_input2d.t(), x2d)),
          in_dtype(at::mm(grad_hidden2d.t(), in_gemm(previous_hidden).view({T * B, H}))),
          in_dtype(grad_b_ih),
          in_dtype(grad_b_hh)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_layer_forward(
    const at::Tensor& x_in, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih_in,
    const std::optional<at::Tensor>& b_hh_in, const std::optional<at::Tensor>& lengths_in,
    bool reverse) {
  return layer_forward<LstmLayerCell>(x_in, h0, &c0, w_ih, w_hh, b_ih_in,
                                      b_hh_in, lengths_in, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward(const at::Tensor& grad_output_in, const at::Tensor& grad_h_n_in,
                    const at::Tensor& grad_c_n_in, const at::Tensor& x_in, const at::Tensor& h0_in,
                    const at::Tensor& c0_in, const at::Tensor& w_ih, const at::Tensor& w_hh,
                    const std::optional<at::Tensor>& b_ih_in,
                    const std::optional<at::Tensor>& b_hh_in,
                    const std::optional<at::Tensor>& lengths_in, bool reverse,
                    const at::Tensor& output_in, const at::Tensor& saved_in) {
  return layer_backward<LstmLayerCell>(grad_output_in, grad_h_n_in,
                                       &grad_c_n_in, x_in, h0_in, &c0_in, w_ih, w_hh, b_ih_in,
                                       b_hh_in, lengths_in, reverse, output_in, saved_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_layer_forward(
    const at::Tensor& x_in, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih_in, const std::optional<at::Tensor>& b_hh_in,
    const std::optional<at::Tensor>& lengths_in, bool reverse) {
  auto [output, h_n, no_cell_state, saved] = layer_forward<GruLayerCell>(
      x_in, h0, nullptr, w_ih, w_hh, b_ih_in, b_hh_in, lengths_in, reverse);
  return {output, h_n, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_layer_backward(const at::Tensor& grad_output_in, const at::Tensor& grad_h_n_in,
                   const at::Tensor& x_in, const at::Tensor& h0_in, const at::Tensor& w_ih,
                   const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih_in,
                   const std::optional<at::Tensor>& b_hh_in,
                   const std::optional<at::Tensor>& lengths_in, bool reverse,
                   const at::Tensor& output_in, const at::Tensor& saved_in) {
  auto [grad_x, grad_h0, no_cell_grad, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh] =
      layer_backward<GruLayerCell>(grad_output_in, grad_h_n_in, nullptr,
                                   x_in, h0_in, nullptr, w_ih, w_hh, b_ih_in, b_hh_in,
                                   lengths_in, reverse, output_in, saved_in);
  return {grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh};
}

}  // namespace
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("lstm_cell_forward", &fastattn::lstm_cell_forward);
  m.impl("lstm_cell_backward", &fastattn::lstm_cell_backward);
  m.impl("gru_cell_forward", &fastattn::gru_cell_forward);
  m.impl("gru_cell_backward", &fastattn::gru_cell_backward);
  m.impl("lstm_layer_forward", &fastattn::lstm_layer_forward);
  m.impl("lstm_layer_backward", &fastattn::lstm_layer_backward);
  m.impl("gru_layer_forward", &fastattn::gru_layer_forward);
  m.impl("gru_layer_backward", &fastattn::gru_layer_backward);
}
