"""Saves the cpu backend's attention outputs and gradients over 192 cases (float32, float64,
bfloat16, float16; dot, cosine and location scores; no mask, lengths, causal where T = S;
shapes of one block of scores to several) to FILE: `python outputs_of_a_build.py FILE`, run
with each build on PYTHONPATH.  `python outputs_of_a_build.py --compare BEFORE AFTER` prints
each tensor that differs (case, output index, dtype, shape, largest difference, largest
entry) and how many did."""
import sys

import torch

import fastattn

SHAPES = [(2, 600, 1800, 9, 5), (5, 300, 1000, 8, 3), (3, 40, 70, 16, 8), (1, 2048, 700, 128, 64),
          (4, 64, 256, 130, 33), (3, 500, 500, 24, 7), (1, 1200, 1200, 128, 40)]


def outputs():
    results = {}
    cases = [(dtype, shape, score, mode) for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
             for shape in SHAPES for score in ("dot", "cosine", "location") for mode in ("none", "lengths", "causal")]
    for index, (dtype, (batch, queries, source, dim, value_dim), score, mode) in enumerate(cases):
        if mode == "causal" and queries != source:
            continue
        generator = torch.Generator().manual_seed(index)
        query, keys, values = (torch.randn(batch, length, size, generator=generator).to(dtype).requires_grad_()
                               for length, size in ((queries, dim), (source, dim), (source, value_dim)))
        arguments = {}
        if score == "location":
            arguments["weight"] = torch.randn(source, dim, generator=generator).to(dtype).requires_grad_()
        if mode == "lengths":
            arguments["lengths"] = torch.tensor([0, source, source - 5, source // 2, 3][:batch])
        if mode == "causal":
            arguments["causal"] = True
        with fastattn.backend("cpu"):
            context, weights = fastattn.attention(query, keys, values, score=score, return_weights=True, **arguments)
            grad = torch.randn(context.shape, generator=generator).to(dtype)
            leaves = [query, keys, values] + ([arguments["weight"]] if "weight" in arguments else [])
            grads = torch.autograd.grad(context, leaves, grad, allow_unused=True)
            detached = {name: value.detach() if torch.is_tensor(value) else value for name, value in arguments.items()}
            with torch.no_grad():
                context_alone = fastattn.attention(query, keys, values, score=score, **detached)
        results[index] = [context.detach(), weights.detach(), context_alone, *grads]
    return results


def compare(before_file, after_file):
    before, after = torch.load(before_file), torch.load(after_file)
    differing = total = 0
    for index in before:
        for position, (old, new) in enumerate(zip(before[index], after[index], strict=True)):
            if old is None:
                continue
            total += 1
            if not torch.equal(old, new) and not old.isnan().any():
                differing += 1
                print(index, position, old.dtype, tuple(old.shape), float((old.double() - new.double()).abs().max()),
                      float(old.double().abs().max()))
    print(f"{differing} of {total} tensors differ, over {len(before)} cases")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 2:
        torch.save(outputs(), sys.argv[1])
    else:
        sys.exit("usage: python outputs_of_a_build.py FILE | --compare BEFORE AFTER")
