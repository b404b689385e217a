// decoder_step_entry.cpp: C entry points to the launch functions of decoder_step.cu for
// ctypes (tests/test_cuda_decoder_step.py); emulation.py builds it with runtime.cpp.
#include "../launch.h"

using namespace fastattn::cuda;

extern "C" {
int emu_decoder_step_plan(const DecoderStepProblem* p, int multiprocessors, int64_t shared_bytes_per_block,
                          DecoderStepPlan* plan) {
  *plan = decoder_step_plan(*p, multiprocessors, shared_bytes_per_block);
  return cudaSuccess;
}
int emu_decoder_step_plan_on_device(const DecoderStepProblem* p, DecoderStepPlan* plan) {
  return decoder_step_plan_on_device(*p, plan);
}
int emu_decoder_step(const DecoderStepProblem* p, const DecoderStepPlan* plan, const DecoderStepBuffers* b) {
  return launch_decoder_step(*p, *plan, *b, nullptr);
}
}
