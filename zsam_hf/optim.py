"""``ZSAM``: the two-pass step as a ``torch.optim.Optimizer``, for loops that are not the Trainer.

The surface is the one SAM users already write (davda54/sam, the ZSharp authors' Lightning loop)::

    loss_fn(model(x), y).backward()
    optimizer.first_step(zero_grad=True)     # climb to w + e from the gradients in .grad
    loss_fn(model(x), y).backward()
    optimizer.second_step(zero_grad=True)    # back to w bit for bit, then the base optimizer's step

or ``optimizer.step(closure)`` with a closure that recomputes the loss and calls ``backward()``.
Under gradient accumulation (accelerate's ``accumulate``, or by hand) each micro-batch takes its
own ascent, so the ascent gradient must not mix with the descent gradients already accumulated::

    with optimizer.ascent():                 # .grad set aside; g of this micro-batch alone
        accelerator.backward(model(**batch).loss)
    accelerator.backward(model(**batch).loss)    # at w + e: adds to the accumulated .grad
    optimizer.restore()                      # back to w before the next micro-batch
    accelerated_optimizer.step()             # accelerate's (only on sync steps): the base step
It is a thin front door: e is built, applied and undone by ``perturbation.SharpnessPerturbation``,
the very code the Trainer's step runs, so both give the same weights on the same batches.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from .capturable import check_capturable
from .perturbation import DEFAULT_RHO, NORMALIZATIONS, VARIANTS, AppliedPerturbation, SharpnessPerturbation
from .sharding import all_reduce_mean

ParamsT = Iterable[torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | Iterable[dict]


def _named_groups(params: ParamsT) -> tuple[list[dict], dict[int, str], bool]:
    """Param groups of plain tensors, each tensor's name (by id), and whether the caller gave names."""
    items = list(params)
    if not items:
        raise ValueError("ZSAM got an empty parameter list")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    names: dict[int, str] = {}
    named = None
    plain_groups = []
    for group in groups:
        tensors = []
        for entry in (
            list(group["params"]) if not isinstance(group["params"], torch.Tensor) else [group["params"]]
        ):
            is_pair = isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)
            named = is_pair if named is None else named
            if is_pair != named:
                raise ValueError(
                    "ZSAM params mix named (name, tensor) pairs and plain tensors: give one kind"
                )
            name, tensor = entry if is_pair else (f"param{len(names)}", entry)
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"ZSAM params must be tensors or (name, tensor) pairs, got {type(tensor).__name__}"
                )
            names[id(tensor)] = name
            tensors.append(tensor)
        plain_groups.append({**group, "params": tensors})
    return plain_groups, names, bool(named)


class ZSAM(torch.optim.Optimizer):
    """ZSAM (or SAM, ASAM, Friendly-SAM) around any base optimizer.

    Args:
        params: ``model.parameters()``, ``model.named_parameters()`` (ASAM needs the names: it
            scales parameters whose name contains "weight"), or param groups of either.
        base_optimizer: the optimizer class that takes the actual step (``torch.optim.AdamW``, ...),
            built here on the same param groups with ``base_optimizer_kwargs``.
        variant: "zsam" (default), "sam", "asam", "fsam" or "random" (the control: as many entries
            per weight tensor as zsam keeps, drawn at random from (``seed``, step) each step).
        rho: radius of the ascent step; None picks the variant's default (0.05; ASAM 0.5).
        quantile: ZSAM's Q_p: entries with |z| above this quantile are kept (0.95 keeps 5%).
        normalization: "global" (the paper: ||e|| = rho) or "tensor" (the released code: each weight
            tensor's e has norm rho); applies to zsam, random and sam.
        asam_eta: ASAM's eta in T = |w| + eta.
        fsam_sigma: Friendly-SAM's weight of the removed average.
        fsam_lambda: Friendly-SAM's average decay.
        sync_ascent: average the ascent gradient over the processes of the default process group
            before building e (one flat all-reduce); False (default): each replica climbs with its
            own gradient, as in the SAM paper (take the ascent backward inside ``no_sync``).
        seed: with the number of base steps taken, what the random control's masks are drawn from
            (saved in ``state_dict``, so a resumed loop draws the same masks).
        capturable: no host synchronization in ``first_step`` and ``second_step`` (zsam and sam), so
            a CUDA graph can capture the whole two-pass step; passed on to the base optimizer when
            it takes it (Adam, AdamW...). The weights between the passes live in a buffer per
            parameter, as SAM's do: SAM's memory, not ZSAM's 0.1-0.15x (docs/own-loop.md). A
            non-finite ascent gradient climbs by e = 0 and ``last_perturbation_norm`` is 0.

    ``param_groups`` are the base optimizer's own, so a learning-rate scheduler built on either
    drives both. ``state_dict()`` holds the base optimizer's state and Friendly-SAM's average.
    """

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type[torch.optim.Optimizer],
        *,
        variant: str = "zsam",
        rho: float | None = None,
        quantile: float = 0.95,
        normalization: str = "global",
        asam_eta: float = 0.01,
        fsam_sigma: float = 1.0,
        fsam_lambda: float = 0.9,
        sync_ascent: bool = False,
        seed: int = 0,
        capturable: bool = False,
        **base_optimizer_kwargs,
    ):
        _check_arguments(base_optimizer, variant, rho, quantile, normalization)
        if capturable:
            check_capturable(variant)
            if "capturable" in inspect.signature(base_optimizer).parameters:
                base_optimizer_kwargs["capturable"] = True
        groups, self._names, named = _named_groups(params)
        if variant == "asam" and not named:
            raise ValueError(
                "variant='asam' scales the parameters whose name contains 'weight': pass "
                "model.named_parameters() as params, not model.parameters()"
            )
        rho = DEFAULT_RHO[variant] if rho is None else rho
        self._ready = False
        self.base_optimizer = base_optimizer(groups, **base_optimizer_kwargs)
        super().__init__(self.base_optimizer.param_groups, dict(self.base_optimizer.defaults))
        self.param_groups = self.base_optimizer.param_groups  # one set of groups: schedulers drive both
        self._ready = True
        self.perturbation = SharpnessPerturbation(
            variant=variant, rho=rho, quantile=quantile, normalization=normalization, asam_eta=asam_eta,
            fsam_sigma=fsam_sigma, fsam_lambda=fsam_lambda, seed=seed, capturable=capturable,
        )  # fmt: skip
        self._steps = 0  # base steps taken: with ``seed``, what the random control's masks are drawn from
        self.sync_ascent = sync_ascent
        self._applied: AppliedPerturbation | None = None
        self._climbed = False  # a first_step since the last base step
        self.last_perturbation_norm: torch.Tensor | None = None  # ||e|| of the latest first_step

    # ---- the two-pass step -------------------------------------------------------------------
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Climb to the neighbour w + e, e built from the gradients now in ``.grad``."""
        if self._applied is not None:
            raise RuntimeError("first_step() was called twice: call second_step() after each first_step()")
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            raise RuntimeError(
                "first_step() found no gradient in .grad: compute the loss and call loss.backward() first"
            )
        # e is built in the gradient buffers themselves when they are about to be cleared anyway
        grads = [p.grad if zero_grad else p.grad.clone() for p in params]
        if self.sync_ascent and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            grads = all_reduce_mean(grads, params)
        names = [self._names.get(id(p), f"param{i}") for i, p in enumerate(params)]
        self._applied, stats = self.perturbation.perturb(names, params, grads, step=self._steps)
        self._climbed = True
        self.last_perturbation_norm = None if stats is None else stats.norm
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Go back to w exactly, then let the base optimizer step with the gradient taken at w + e."""
        if self._applied is None:
            raise RuntimeError("second_step() was called without first_step(): call first_step() before it")
        self._applied.restore()
        self._applied = None
        # Under Lightning's manual optimization `self` is its LightningOptimizer wrapper, whose hooks
        # count the step (trainer.global_step) when step() is called; second_step is that step here.
        getattr(self, "_on_before_step", _nothing)()
        self._base_step()
        getattr(self, "_on_after_step", _nothing)()
        if zero_grad:
            self.zero_grad()

    def _base_step(self) -> None:
        self.base_optimizer.step()
        self._steps += 1
        self._climbed = False
        # An LR scheduler on this optimizer sees the step (as after optimizer.step()). Under Lightning
        # `self` is its LightningOptimizer wrapper, with a copy of our attributes and the optimizer
        # the scheduler was built on in `_optimizer`: that one must see it too.
        for stepped in (self, getattr(self, "_optimizer", None)):
            if stepped is not None:
                stepped._opt_called = True

    @contextlib.contextmanager
    def ascent(self):
        """The backward inside computes the ascent gradient alone; on leaving, climb to w + e.

        The gradients already in ``.grad`` (earlier micro-batches' descent gradients under
        accumulation) are set aside, not copied, and put back once e is built.
        """
        if self._applied is not None:
            raise RuntimeError("ascent() while at w + e: call restore() or second_step() first")
        params = [p for group in self.param_groups for p in group["params"]]
        stashed = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            yield self
            self.first_step(zero_grad=True)
        finally:
            for p, grad in zip(params, stashed):
                p.grad = grad

    @torch.no_grad()
    def restore(self) -> None:
        """Back to w bit for bit, without a step (a no-op at w)."""
        if self._applied is not None:
            self._applied.restore()
            self._applied = None

    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """With ``closure``: both steps (``.grad`` holds the gradient at w; the closure recomputes the loss
        and calls ``backward()``, with autograd on, at w + e); returns its loss. Without: finish the step,
        back to w if needed, then the base optimizer's step (what accelerate's wrapper and a GradScaler call).
        """
        if closure is None:
            if not self._climbed:
                raise RuntimeError(
                    "ZSAM.step() without a closure, and no first_step() or ascent() since the last step: "
                    "that would be the base optimizer's plain step. In a transformers Trainer (which calls "
                    "optimizer.step() with no closure), do not pass ZSAM as the Trainer's optimizer: use "
                    "zsam_hf.ZSAMTrainer with ZSAMTrainingArguments, or zsam_hf.with_zsam(YourTrainer, "
                    "YourArguments), which take the two passes inside training_step. In your own loop, pass "
                    "a closure that recomputes the loss and calls backward(), or call first_step() (or use "
                    "ascent()) before it"
                )
            if self._applied is None:
                self._base_step()
            else:
                self.second_step()
            return None
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad():
                loss = closure()
            if not any(p.grad is not None for group in self.param_groups for p in group["params"]):
                raise RuntimeError("the closure computed no gradient: it must call loss.backward()")
        except BaseException:
            self._applied.restore()  # never leave the weights at w + e
            self._applied = None
            raise
        self.second_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "base_optimizer": self.base_optimizer.state_dict(),
            "perturbation": self.perturbation.state_dict(),
            "steps": self._steps,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self.param_groups = self.base_optimizer.param_groups
        device = next((p.device for g in self.param_groups for p in g["params"]), None)
        self.perturbation.load_state_dict(state_dict.get("perturbation", {}), device=device)
        self._steps = int(state_dict.get("steps", 0))

    def add_param_group(self, param_group: dict) -> None:
        if not self._ready:  # torch.optim.Optimizer.__init__ adds the base optimizer's groups
            return super().add_param_group(param_group)
        groups, names, _ = _named_groups([param_group])
        self._names.update(names)
        self.base_optimizer.add_param_group(groups[0])
        self.param_groups = self.base_optimizer.param_groups

    @property
    def state(self):
        return self.base_optimizer.state

    @state.setter
    def state(self, value) -> None:  # torch.optim.Optimizer.__init__ assigns an empty one: keep the base's
        pass


def _nothing() -> None:
    pass


def _check_arguments(base_optimizer, variant, rho, quantile, normalization) -> None:
    if isinstance(base_optimizer, torch.optim.Optimizer):
        name = type(base_optimizer).__name__
        raise TypeError(
            f"base_optimizer is a {name} instance: pass the class ({name}) and its arguments as keywords, "
            f"e.g. ZSAM(model.parameters(), torch.optim.{name}, lr=...), so both share one set of param groups"
        )
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        raise TypeError(
            f"base_optimizer={base_optimizer!r} is invalid: expected a torch.optim.Optimizer class such as "
            "torch.optim.AdamW (the class, not an instance; its arguments go to ZSAM as keywords)"
        )
    if variant not in VARIANTS or variant == "none":
        raise ValueError(f"variant={variant!r} is invalid: expected one of {', '.join(VARIANTS[:-1])}")
    if rho is not None and not (isinstance(rho, (int, float)) and rho > 0 and rho != float("inf")):
        raise ValueError(f"rho={rho!r} is invalid: expected a finite number > 0 (or None for the default)")
    if not (isinstance(quantile, (int, float)) and 0 <= quantile < 1):
        raise ValueError(f"quantile={quantile!r} is invalid: expected a number in [0, 1)")
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"normalization={normalization!r} is invalid: expected one of {', '.join(NORMALIZATIONS)}"
        )
