"""What the triton backend's hard attention runs after the soft weights (the choice of a
position per row and the outputs there), forward and backward, counted on CPU tensors under
Triton's interpreter: the outermost ATen ops the profiler records (each one kernel launch,
or more, on a GPU; view and metadata ops, which launch nothing, apart) and the Triton kernel
launches (fastattn.ops.triton_launch.run_kernel; the tensor ops the interpreter makes while it
runs a kernel are not counted).  Runs against either tree: one whose
fastattn.ops.triton_hard has ``hard_attention_outputs`` (the fused op), or one with
``choose_positions`` (the choice kernel, then the reference's ``outputs_at``).

    TRITON_INTERPRET=1 PYTHONPATH=<tree> python launches.py
"""

import collections
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import fastattn  # noqa: E402, F401  (registers the ops)
from fastattn.ops import triton_hard, triton_launch  # noqa: E402
from fastattn.reference.hard import outputs_at  # noqa: E402

KERNEL_RANGE = "triton kernel (interpreted)"
NO_LAUNCH = {"aten::view", "aten::reshape", "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::detach",
             "aten::alias", "aten::t", "aten::transpose", "aten::permute", "aten::select", "aten::slice",
             "aten::_unsafe_view", "aten::as_strided", "aten::lift_fresh", "aten::empty", "aten::empty_like",
             "aten::new_empty", "aten::empty_strided", "aten::item", "aten::_local_scalar_dense", "aten::to",
             "aten::result_type", "aten::is_nonzero", "aten::resolve_conj", "aten::resolve_neg"}


def outputs(weights, values, sample, generator):
    if hasattr(triton_hard, "hard_attention_outputs"):
        return triton_hard.hard_attention_outputs(weights, values, sample, generator)
    index = triton_hard.choose_positions(weights.detach(), sample, generator)
    return outputs_at(weights, index, values)


def outermost_aten_ops(prof) -> collections.Counter:
    """The ATen ops called outside other ATen ops and outside a Triton kernel's run."""
    counts = collections.Counter()
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::") and parent.name != KERNEL_RANGE:
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] += 1
    return counts


def main():
    print("tree:", "fused (hard_attention_outputs)" if hasattr(triton_hard, "hard_attention_outputs")
          else "choose_positions + outputs_at")
    generator = torch.Generator().manual_seed(0)
    batch, queries, positions, features = 16, 20, 49, 256  # teacher-forced captions over a 7 x 7 grid
    launches = []
    original = triton_launch.run_kernel

    def counted(kernel, grid, *arguments, **constexprs):
        launches.append(triton_launch._kernel_name(kernel))
        with record_function(KERNEL_RANGE):  # the interpreter's own tensor ops are not counted
            return original(kernel, grid, *arguments, **constexprs)

    triton_launch.run_kernel = counted
    for sample in (False, True):
        scores = torch.randn(batch, queries, positions, generator=generator)
        weights = torch.softmax(scores, dim=-1).requires_grad_()
        values = torch.randn(batch, positions, features, generator=generator, requires_grad=True)
        outputs(weights, values, sample, generator)  # once first: the first call also builds what later ones reuse
        for phase in ("forward", "backward"):
            if phase == "backward":
                grads = [torch.ones_like(context), torch.ones_like(log_prob)]
            launches.clear()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                if phase == "forward":
                    context, _, log_prob = outputs(weights, values, sample, generator)
                else:
                    torch.autograd.backward([context, log_prob], grads)
            counts = outermost_aten_ops(prof)
            launching = {name: count for name, count in counts.items() if name not in NO_LAUNCH}
            quiet = {name: count for name, count in counts.items() if name in NO_LAUNCH}
            print(f"{'sample' if sample else 'argmax'} {phase}: {sum(launching.values())} ATen ops that launch, "
                  f"{len(launches)} Triton launches ({sum(quiet.values())} ATen ops that do not launch)")
            print("  ATen:", ", ".join(f"{name[6:]} x{count}" for name, count in sorted(launching.items())) or "-")
            print("  Triton:", ", ".join(f"{name} x{count}" for name, count in sorted(collections.Counter(launches).items())) or "-")
            print("  not launching:", ", ".join(f"{name[6:]} x{count}" for name, count in sorted(quiet.items())) or "-")


if __name__ == "__main__":
    main()
