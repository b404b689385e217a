"""How the Triton kernels are launched: the interpreter switch, the one-config-or-tuned
``Launcher``, and the check that the kernels' offsets cannot overflow.

On a GPU a ``Launcher`` tunes its kernel over the short explicit config list of
``fastattn.ops.triton_configs``, keyed on the kernel's size arguments rounded up to
powers of two (one ``triton.autotune`` per bucket and constexpr specialization, so a
new sequence length in the same bucket reuses the tuned config instead of benchmarking
again, while IEEE and TF32 dots or another score kind tune on their own); buffers a kernel
accumulates into atomically are re-zeroed between trials (``reset_to_zero``).  Once a
bucket's tuner has chosen, its launches skip the tuner and take that config to the kernel.  Under
Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors, the tests) nothing is
tuned: each kernel runs its single interpreter config, 16-wide blocks, so small odd
test shapes still cross block boundaries, loop over feature tiles and split the keys
of a decode step.

``FASTATTN_TRITON_AUTOTUNE=0`` turns the tuning off on a GPU: each launch takes the first
config of the list that the kernel's prune keeps for its sizes, compiled once, never
benchmarked (the one-script GPU proof sets it for its tests and benchmark, which must fit
a few minutes; tuning compiles every config of every kernel for every size bucket).

Offsets: the attention kernels compute the offset of a batch element in 64 bits (a
few 64-bit multiplies per program: five in the additive forward's PTX) and offsets
inside it in 32 bits; the LSTM/GRU kernels, bound by memory, use 64 bits throughout.
64-bit offsets everywhere would cost integer instructions and registers in every
inner-loop address of the attention kernels, while inside one batch element 2^31
elements means T·S or S·D beyond two billion, far past the sequence lengths these ops
serve; so a tensor whose largest offset below its leading dimension reaches 2^31 is
refused before the launch instead (the weights of 2^17 sequences of 128 × 128, past
2^31 in all, are fine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Optional

import torch
import triton
from torch._library.triton import is_wrap_triton_enabled
from torch._subclasses.fake_tensor import FakeTensor

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
SMALLEST_BLOCK = 16  # tl.dot needs 16 rows and columns at least
INDEX_LIMIT = 2**31  # offsets inside one batch element are int32 in the kernels
# Below this many (query block, batch) programs a decode step splits its keys across programs.
TARGET_PROGRAMS = 4 if INTERPRETED else 264


@dataclasses.dataclass(frozen=True)
class KernelConfigs:
    """One kernel's launch choices: the single config the interpreter runs, the configs
    tuned on a GPU, the size arguments that key the tuning, the buffers the kernel adds
    into (re-zeroed between trials) and an optional ``early_config_prune``.  A prune
    decides from the constexprs and the tensors' dtypes alone (tile footprints, dot
    precision), never from sizes or values: an untuned launch memoizes its choice on those."""

    interpreted: triton.Config
    tuned: tuple[triton.Config, ...]
    key: tuple[str, ...]
    reset_to_zero: tuple[str, ...] = ()
    prune: Optional[Callable] = None


def autotuning() -> bool:
    """Whether launches on a GPU tune over the config lists (FASTATTN_TRITON_AUTOTUNE, default 1)."""
    return os.environ.get("FASTATTN_TRITON_AUTOTUNE", "1") != "0"


def _is_fake(value) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_meta or isinstance(value, FakeTensor))


def _interpreted_on_fakes(values) -> bool:
    """Whether a launch has nothing to run: the interpreter would read fake tensors' memory."""
    return INTERPRETED and any(_is_fake(value) for value in values)


def check_offsets(tensor: torch.Tensor, kernel_name: str) -> None:
    """Refuse a tensor whose offsets below its leading dimension (all of a 1-D tensor's)
    reach 2^31: the kernels add those to a 64-bit batch base in 32 bits."""
    if tensor.numel() < INDEX_LIMIT and tensor.is_contiguous():  # every offset is below numel: fine
        return
    dims = zip(tensor.shape[1:], tensor.stride()[1:]) if tensor.dim() > 1 else zip(tensor.shape, tensor.stride())
    if sum((size - 1) * abs(stride) for size, stride in dims if size > 0) >= INDEX_LIMIT:
        raise ValueError(
            f"the triton backend indexes inside one batch element with 32-bit offsets, got a tensor of shape "
            f"{tuple(tensor.shape)} and strides {tensor.stride()} whose offsets below its first dimension reach "
            f"2^31 for {kernel_name}; use the cuda or reference backend for it"
        )


def contiguous_or_none(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An optional tensor argument as the kernels index it: contiguous."""
    return None if tensor is None else tensor.contiguous()


def pointer_or(tensor: Optional[torch.Tensor], stand_in: torch.Tensor) -> torch.Tensor:
    """An optional tensor argument of a kernel: ``stand_in`` when absent (the kernel's flag
    for it is off, so it is never read)."""
    return stand_in if tensor is None else tensor


def _kernel_name(kernel) -> str:
    while not hasattr(kernel, "__name__") and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return getattr(kernel, "__name__", type(kernel).__name__)


def run_kernel(kernel, grid, *arguments, **constexprs):
    """``wrap_triton(kernel)[grid](...)``, after ``check_offsets`` on every tensor.  Under
    the interpreter a launch on fake tensors (opcheck, torch.compile tracing) is skipped,
    as Triton's higher-order op does for compiled kernels: only the outputs' shapes
    matter there, and the interpreter would read the fake tensors' memory."""
    # Each tensor once: the absent optional ones are stand-ins, the same tensor again.
    tensors = {id(value): value for value in arguments if isinstance(value, torch.Tensor)}.values()
    if _interpreted_on_fakes(tensors):
        return
    name = _kernel_name(kernel)
    for tensor in tensors:
        check_offsets(tensor, name)
    _traceable(kernel)[grid](*arguments, **constexprs)


def _traceable(kernel):
    """``wrap_triton(kernel)``: the kernel itself where wrap_triton is off (an eager call, see
    ``fastattn.ops.triton_eager``: what wrap_triton returns there, without its imports, about
    4 us a launch on the CI machine), and under the interpreter with a torch older than 2.13,
    whose ``wrap_triton`` takes only compiled kernels (the interpreter runs nothing under
    torch.compile anyway, see run_kernel)."""
    if not is_wrap_triton_enabled():
        return kernel
    try:
        return torch.library.wrap_triton(kernel)
    except RuntimeError:
        if INTERPRETED:
            return kernel
        raise


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for inputs of ``dtype``.  float32 follows torch's
    matmul setting, as torch's own float32 matmuls on a GPU do: TF32 tensor cores when
    ``torch.backends.cuda.matmul.fp32_precision`` is "tf32" (what
    ``torch.set_float32_matmul_precision("high")`` or ``matmul.allow_tf32 = True`` set),
    otherwise IEEE float32 (FMA loops).  float16/bfloat16 run on the tensor cores whatever
    it says."""
    if dtype != torch.float32:
        return "tf32"
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)  # torch >= 2.9; reading it never raises
    allowed = precision == "tf32" if precision is not None else matmul.allow_tf32
    return "tf32" if allowed else "ieee"


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    """torch's float32 matmul precision "tf32" or "ieee" for a block, then the one before (the
    compile check and the tests use this).  Set through ``torch.set_float32_matmul_precision``,
    which sets ``matmul.fp32_precision`` (what ``dot_precision`` reads) and the legacy setting
    together: torch 2.11 and 2.13 check that the two agree before each cuBLAS float32 matmul
    and raise ("mix of the legacy and new APIs") after ``fp32_precision = "tf32"`` alone."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision({"tf32": "high", "ieee": "highest"}[precision])
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# Host-side integer helpers: triton.cdiv and triton.next_power_of_2 are Triton constexpr
# functions in triton 3.9, which cost 2.5 to 4 us a call from Python (measured on the
# 2-core CI machine), several times per launch; these are the same arithmetic.
def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def next_power_of_2(size: int) -> int:
    """The least power of two >= size (0 for 0, as triton.next_power_of_2)."""
    return 0 if size <= 0 else 1 << (int(size) - 1).bit_length()


def power_of_two_block(size: int, cap: int | None = None) -> int:
    block = max(SMALLEST_BLOCK, next_power_of_2(size))
    return block if cap is None else min(block, cap)


def tuning_bucket(size: int) -> int:
    """The power of two at or above ``size`` (1 for 0): sizes that share a tuned config."""
    return next_power_of_2(max(int(size), 1))


def _dtypes(arguments) -> tuple:
    return tuple(value.dtype for value in arguments if isinstance(value, torch.Tensor))


class Launcher:
    """A kernel with its ``KernelConfigs``: ``launcher(grid, *args, **constexprs)``, where
    ``grid`` is a function of the chosen meta-parameters (BLOCK_T, BLOCK_S, ...) and the
    arguments are the kernel's, positional, without those meta-parameters."""

    def __init__(self, kernel, configs: KernelConfigs):
        names = set(kernel.arg_names)
        for field in ("key", "reset_to_zero"):
            unknown = [name for name in getattr(configs, field) if name not in names]
            if unknown:
                raise ValueError(f"KernelConfigs.{field} names {unknown}, not arguments of {kernel.__name__}")
        self.kernel = kernel
        self.configs = configs
        self.tuners = {}  # (size bucket, constexprs) -> triton.autotune(kernel); empty under the interpreter
        self.untuned = {}  # (constexprs, tensor dtypes) -> the untuned config (pruning costs ~25 us a launch)
        self.tuned = {}  # (size bucket, constexprs, tensor dtypes) -> the config its tuner chose

    def configs_in_use(self) -> list[triton.Config]:
        return [self.configs.interpreted] if INTERPRETED else list(self.configs.tuned)

    def pruned_configs(self, arguments, constexprs) -> list[triton.Config]:
        """The tuned configs that the kernel's prune keeps for these arguments (all without one)."""
        configs = list(self.configs.tuned)
        if self.configs.prune is not None:
            configs = self.configs.prune(configs, dict(zip(self.kernel.arg_names, arguments)), **constexprs)
        return configs

    def untuned_config(self, arguments, constexprs) -> triton.Config:
        """The config an untuned GPU launch takes: the first that the prune keeps."""
        key = (*constexprs.items(), *_dtypes(arguments))
        config = self.untuned.get(key)
        if config is None:
            config = self.untuned[key] = self.pruned_configs(arguments, constexprs)[0]
        return config

    def _bucket(self, arguments, constexprs) -> tuple:
        """The size bucket of these (positional) kernel arguments, with these constexprs (a
        score kind, a mask, IEEE or TF32 dots: each specialization is tuned on its own)."""
        named = dict(zip(self.kernel.arg_names, arguments))
        return (*(tuning_bucket(named[name]) for name in self.configs.key), *sorted(constexprs.items()))

    def tuner_for(self, arguments, constexprs):
        """The ``triton.autotune`` of the size bucket of these arguments and constexprs."""
        bucket = self._bucket(arguments, constexprs)
        if bucket not in self.tuners:
            prune = {"early_config_prune": self.configs.prune} if self.configs.prune is not None else None
            # key=[]: this tuner serves one bucket (Triton still keys it on the tensors' dtypes).
            self.tuners[bucket] = triton.autotune(
                list(self.configs.tuned), key=[], prune_configs_by=prune,
                reset_to_zero=list(self.configs.reset_to_zero) or None,
            )(self.kernel)
        return self.tuners[bucket]

    def _tuned_key(self, arguments, constexprs) -> tuple:
        # Triton's autotuner keys its choice on the tensors' dtypes as well.
        return (self._bucket(arguments, constexprs), *_dtypes(arguments))

    def _chosen(self, arguments, constexprs) -> Optional[tuple[triton.Config, dict]]:
        """(the config of a launch with these arguments, the options it passes the kernel), or
        None while the launch still has to tune.  Once a bucket's tuner has chosen, its launches
        take that config straight to the kernel with the options the tuner would pass (its run
        took 88 us of own host time a launch under cProfile on an H200:
        benchmarks/results/2026-12-04-h200/rerun-3)."""
        if INTERPRETED:
            config = self.configs.interpreted
            return config, dict(config.kwargs)
        if not autotuning():
            config = self.untuned_config(arguments, constexprs)
            return config, {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
        config = self.tuned.get(self._tuned_key(arguments, constexprs))
        return None if config is None else (config, config.all_kwargs())

    def __call__(self, grid, *arguments, **constexprs):
        chosen = self._chosen(arguments, constexprs)
        if chosen is None:
            tuner = self.tuner_for(arguments, constexprs)
            run_kernel(tuner, grid, *arguments, **constexprs)
            self.tuned[self._tuned_key(arguments, constexprs)] = tuner.best_config
            return
        config, options = chosen
        run_kernel(self.kernel, grid(dict(config.kwargs)), *arguments, **constexprs, **options)


def _skipped(*arguments) -> None:
    """A launch with nothing to run (``_interpreted_on_fakes``)."""


class RepeatedLaunch:
    """One launch site called again and again with tensors of the same shapes, strides and
    dtypes (a layer's time steps: views of its state buffers; the launches of a memoized
    plan, ``LaunchPlans``): ``launch(*tensors)``, the kernel's leading tensor arguments, after
    which come the fixed ``scalars``, then the ``constexprs``.  The first call goes through
    the ``Launcher`` (offset checks, config, tuning); later calls take the config it chose and
    its grid straight to the kernel, their offsets checked by the first (they depend on shapes
    and strides alone): 19 -> 7 us of Python a layer step on the CI machine."""

    def __init__(self, launcher: Launcher, grid: Callable[[dict], tuple], scalars: tuple = (), **constexprs):
        self.launcher, self.grid, self.scalars, self.constexprs = launcher, grid, scalars, constexprs
        self.direct: Optional[Callable[..., None]] = None

    def __call__(self, *tensors) -> None:
        if self.direct is not None:
            self.direct(*tensors, *self.scalars, **self.keywords)
            return
        arguments = (*tensors, *self.scalars)
        self.launcher(self.grid, *arguments, **self.constexprs)
        if _interpreted_on_fakes(arguments):
            self.direct, self.keywords = _skipped, {}
            return
        config, options = self.launcher._chosen(arguments, self.constexprs)  # the one the call took or tuned
        self.keywords = {**self.constexprs, **options}
        self.direct = _traceable(self.launcher.kernel)[self.grid(dict(config.kwargs))]


def _layout_key(tensor: Optional[torch.Tensor]):
    return None if tensor is None else (tensor.shape, tensor.stride(), tensor.dtype, tensor.device)


class LaunchPlans:
    """The Triton ops' plans (the checked sizes of a call and its ``RepeatedLaunch`` objects),
    memoized for eager calls on all a plan depends on but the tensors' data: the op, its
    tensors' shapes, strides, dtypes and devices, its other arguments, torch's float32 matmul
    precision and whether launches tune; so a decoder's or a training loop's calls of an op
    after the first skip its checks, sizes and configs.  Traced calls (wrap_triton on: fake
    tensors, launches recorded through wrap_triton) make theirs afresh.  The oldest plan is
    dropped past ``limit``."""

    def __init__(self, limit: int = 256):
        self.limit = limit
        self.plans: dict[tuple, object] = {}

    def get(self, op: str, tensors: tuple, arguments: tuple, build: Callable[[], object]):
        """The plan of ``op`` for ``tensors`` (None for an absent one) and its other
        ``arguments``, from ``build()`` when there is none yet."""
        if is_wrap_triton_enabled():
            return build()
        key = (op, *map(_layout_key, tensors), *arguments, dot_precision(tensors[0].dtype), autotuning())
        plan = self.plans.get(key)
        if plan is None:
            plan = build()
            if len(self.plans) >= self.limit:
                del self.plans[next(iter(self.plans))]
            self.plans[key] = plan
        return plan


LAUNCH_PLANS = LaunchPlans()
