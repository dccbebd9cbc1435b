// The fused N-input logit-program sampler's kernel interface on raw pointers (no torch
// headers). Semantics: proxykern/reference.py (program_logits, program_mask, then
// sample_logits_reference). The launcher (program_sample_cpu.cpp) checks its arguments.
#pragma once
#include <cstdint>

#include "proxy_sample.h"

namespace proxykern {

constexpr int kProgramMinInputs = 2;
constexpr int kProgramMaxInputs = 8;

enum class ProgramMode : int {
  kLinear = 0,      // z = c_0 L_0 + c_1 L_1 + ... (left to right)
  kDifference = 1,  // inputs (b, e, a): z = L_b + s (L_e - L_a), s = coefficients[row, 0]
};

struct ProgramSpec {
  LogitsView inputs[kProgramMaxInputs];
  int n_inputs;
  ProgramMode mode;
  const float* coefficients;  // (B, coefficient_stride) fp32, row-major
  int64_t coefficient_stride;
  int mask_input;             // plausibility mask on this input; -1: none
  const float* mask_log_a;    // (B,): log(a); drop v iff L_r[v] - max L_r < log(a)
};

// CPU kernel: a first pass over the mask input (row max, NaN/+inf check) when there is a
// mask, then the fused op's own CPU sampling on z produced block by block from the inputs.
void program_sample_cpu(const ProgramSpec& program, RowParams params, SampleResult out,
                        int64_t batch, int64_t vocab);

}  // namespace proxykern
