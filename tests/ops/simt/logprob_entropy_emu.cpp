// The CUDA logits kernels (csrc/cuda/logprob_entropy.cu), unchanged, compiled for the SIMT
// emulator (csrc/cuda/simt_emu.h) and registered as covrl_simt::* ops on CPU tensors, with
// the schemas of the covrl ops they implement. Built by tests/ops/test_cuda_emulated.py.
#define COVRL_SIMT_EMU 1
#include "cuda/logprob_entropy.cu"

TORCH_LIBRARY_FRAGMENT(covrl_simt, m) {
  m.def("logprob_entropy_fwd(Tensor logits, Tensor labels, float temperature, bool inplace_grad) -> "
        "(Tensor log_prob, Tensor entropy, Tensor lse)",
        &covrl::lpe_forward_cuda);
  m.def("logprob_entropy_bwd(Tensor grad_log_prob, Tensor? grad_entropy, Tensor logits, Tensor labels, "
        "Tensor lse, Tensor entropy, float temperature) -> Tensor",
        &covrl::lpe_backward_cuda);
  m.def("logprob_entropy_bwd_(Tensor(a!) logits, Tensor grad_log_prob, Tensor? grad_entropy, "
        "Tensor labels, Tensor lse, Tensor entropy, float temperature) -> ()",
        &covrl::lpe_backward_inplace_cuda);
}
