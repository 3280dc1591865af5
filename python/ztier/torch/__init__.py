"""ztier.torch: train an unmodified nn.Module whose parameters live on ztier's tiers.

    model = torchvision.models.resnet50()        # any model, unchanged
    off = ztier.torch.offload(model, "configs/default.yaml")
    opt = off.adamw(lr=1e-3)    # ztier's AdamW (a torch.optim.Optimizer), state on NVMe
    for x, y in batches:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()          # gradients to ztier, partitions updated, step end
        opt.zero_grad()

What offload() does:
  - registers every parameter (its initial value; ztier keeps this rank's
    partition on the configured tier) and every module (its own
    parameters, its parent), then empties each `param.data`: between uses
    a parameter exists only as ztier's partitions. The parameter objects
    stay the model's (optimizers and lr schedulers hold them as usual);
    their shape still reads as the full shape;
  - hooks every module: a module is fetched before its forward and released
    after it, fetched again before its backward and released once its
    parameters' gradients are accumulated. Module outputs and inputs are
    never replaced, so in-place ops on them, any output structure, and
    torch.utils.checkpoint (reentrant or not) work as without ztier;
  - tensors autograd saves that view parameter memory (F.linear's
    weight.t(), chunks of a fused projection) are saved as references and
    rebuilt over the parameter fetched for backward: torch's own backward
    kernels run on the same values, without recomputation;
  - a parameter used outside its module's forward (nn.MultiheadAttention
    reads out_proj.weight itself) is fetched where it is used and, from
    then on, with the module that used it; a use outside any forward of
    the model is an error that names the parameter;
  - with ztier's optimizer (off.adamw / off.adam, parameter groups and lr
    schedulers as torch's), each gradient goes to ztier the moment backward
    completes it (reduce-scattered, averaged over ranks, accumulated over
    micro-batches on the config's gradient tier, host or NVMe) and
    param.grad is freed; step() runs ztier's pipelined optimizer step
    (opt.clip_grad_norm_ and ztier.torch.LossScaler act inside it). A stock
    torch optimizer can update this rank's partitions instead, its state in
    host memory (off.optimizer).

Under torchrun (torch.distributed initialised with more than one rank)
each process is a rank: offload() takes rank, world size and the store from
the process group and broadcasts rank 0's initial parameters (docs/torch.md,
Many processes).

off.save_checkpoint(path, opt, extra=...) saves the training state (the
engine's partitions, gradients and optimizer state, and the Python side:
param_groups, RNG states, buffers, `extra`) as a directory that appears
whole or not at all; off.load_checkpoint(path, opt) restores it, at any
world size, and returns `extra` (docs/torch.md, Checkpoints).

A model too large to build in memory is built under ztier.torch.meta_init()
and materialised module by module by offload() (init=, weights=).
Parameters are float32, float16 or bfloat16 (fp32 master weights in the
optimizer). Buffers (BatchNorm statistics) stay in the model, untouched.
Parameters with requires_grad=False are fetched like the others and get
neither gradients nor optimizer state.
"""

from ztier.torch._amp import LossScaler
from ztier.torch._config import check_memory, memory_estimate, model_config
from ztier.torch._construct import meta_init
from ztier.torch._load import StateDictError, StateDictFile
from ztier.torch._offload import Offload, offload
from ztier.torch._optim import Adam, AdamW, PartitionOptimizer

Optimizer = PartitionOptimizer  # the earlier name

__all__ = ["offload", "Offload", "AdamW", "Adam", "PartitionOptimizer", "Optimizer",
           "model_config", "memory_estimate", "check_memory", "meta_init", "LossScaler",
           "StateDictFile", "StateDictError"]
