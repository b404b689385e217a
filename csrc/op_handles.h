// op_handles.h: the C++ signatures of the fastattn ops that C++ code calls through the
// dispatcher (csrc/autograd.cpp, csrc/decoder_step.cpp), as csrc/ops.cpp's schemas map
// them, and fastattn_op to look one up.  A call through such a handle goes to the
// kernel of the tensors' dispatch keys: autograd first unless a guard excludes it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace fastattn {
namespace ops {

using at::Tensor;
using std::optional;

using AttentionForward = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&, const optional<Tensor>&,
    c10::string_view, double, const optional<Tensor>&, const optional<Tensor>&, bool, optional<int64_t>,
    const optional<Tensor>&, bool, bool);
using AttentionBackward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
    const optional<Tensor>&, c10::string_view, double, const optional<Tensor>&, const optional<Tensor>&, bool,
    optional<int64_t>, const optional<Tensor>&, bool, const Tensor&, bool);
using HardAttentionOutputs = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&);
using HardAttentionOutputsBackward = std::tuple<Tensor, Tensor>(const optional<Tensor>&, const optional<Tensor>&,
                                                                const Tensor&, const Tensor&);
using LstmCellForward = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, const Tensor&, const optional<Tensor>&,
                                                           const optional<Tensor>&);
using LstmCellBackward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const optional<Tensor>&, const optional<Tensor>&, const Tensor&, const Tensor&);
using GruCellForward = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                  const optional<Tensor>&, const optional<Tensor>&);
using GruCellBackward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
    const optional<Tensor>&, const Tensor&);
using LstmLayerForward = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
    const optional<Tensor>&, const optional<Tensor>&, bool);
using LstmLayerBackward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&, bool, const Tensor&,
    const Tensor&);
using GruLayerForward = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&, const optional<Tensor>&,
                                                           const optional<Tensor>&, const optional<Tensor>&, bool);
using GruLayerBackward = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&, bool, const Tensor&, const Tensor&);
using DecoderStep = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&,
    const optional<Tensor>&, const optional<Tensor>&, const optional<Tensor>&, c10::string_view, double,
    const optional<Tensor>&, const optional<Tensor>&, const Tensor&, const Tensor&, const optional<Tensor>&,
    const optional<Tensor>&, const Tensor&, bool, optional<int64_t>, const optional<Tensor>&,
    const optional<Tensor>&);

// The handle of op `name` ("fastattn::attention_forward"), typed with its Signature above.
template <typename Signature>
c10::TypedOperatorHandle<Signature> fastattn_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace ops
}  // namespace fastattn
