"""``ZSAMTrainerMixin``: the two-pass sharpness-aware step for any ``Trainer`` subclass.

Put it first among the bases (``class T(ZSAMTrainerMixin, SFTTrainer)``, or let ``with_zsam``
do it): every method defers to the host class through ``super()``. Only ``training_step``
changes. For each micro-batch:

1. ascent pass: g = grad L_B(w) with the host's own loss (``compute_loss``), taken through
   ``backward()`` with ``.grad`` (which holds the earlier micro-batches' descent gradients
   under accumulation) set aside and put back, inside ``no_sync`` so DDP does not all-reduce
   it, and inside a forked RNG so that the descent pass replays the same dropout masks;
2. climb to w + e (``perturbation.py``);
3. descent pass: the host's own ``training_step`` at w + e (its contexts, its loss, its
   backward), with norm layers' running statistics frozen (the ascent pass already updated
   them) and the host's per-batch metrics left as the ascent pass recorded them (at w);
4. restore w bit for bit.

Everything after ``training_step`` (accumulation, unscale, clipping, the optimizer,
the scheduler, GradScaler skipping, logging, checkpoints) is the host Trainer's own; the
checkpoints are written whole or not at all, and a rerun resumes from the newest whole one
(``lifecycle.py``).

The SAM fields are read from ``trainer.args`` each time training starts, not once at
construction: a hyperparameter search sets them on ``args`` before each trial's ``train()``,
and each trial must train with its own values, checked as construction checks them.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.modules.batchnorm import _NormBase

from .card import CardContext, build_model_card, card_metrics, card_training_rows, pretrained_name, task_of
from .config import ZSAMArgumentsMixin, ZSAMTrainingArguments
from .lifecycle import CheckpointLifecycleMixin
from .perturbation import DEFAULT_RHO, PerturbationStats, SharpnessPerturbation
from .sharding import Shards, all_reduce_mean

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def running_stats_frozen(model: torch.nn.Module):
    """Normalize with batch statistics but leave running statistics (and counters) alone.

    With ``track_running_stats`` off, a training-mode norm layer uses the batch's
    statistics and skips the running-average update, exactly what the descent pass needs.
    """
    layers = [m for m in model.modules() if isinstance(m, _NormBase) and m.training and m.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


class _SharpnessMeter:
    """Per-step SAM metrics summed as device tensors between two logging steps."""

    def __init__(self) -> None:
        # [loss at w, loss at w+e, ||e||, kept fraction, micro-batches whose ascent was taken]
        self.sums: torch.Tensor | None = None
        self.sharpness_steps: set[int] = set()  # optimizer steps that took the two-pass step

    def record(
        self, step: int, loss: torch.Tensor, perturbed_loss: torch.Tensor, stats: PerturbationStats | None
    ) -> None:
        self.sharpness_steps.add(step)
        if self.sums is None:
            self.sums = torch.zeros(5, device=loss.device)
        self.sums[0] += loss.detach().float()
        self.sums[1] += perturbed_loss.detach().float()
        if stats is not None:  # added on the device: a capturable step reads nothing back
            self.sums[2] += _on(stats.norm, self.sums)
            if stats.kept_fraction is not None:
                self.sums[3] += _on(stats.kept_fraction, self.sums)
            self.sums[4] += 1.0 if stats.taken is None else _on(stats.taken, self.sums)

    def reset(self) -> None:
        self.sums, self.sharpness_steps = None, set()


class ZSAMTrainerMixin(CheckpointLifecycleMixin):
    """The two-pass sharpness-aware step (ZSAM, SAM, ASAM, Friendly-SAM) for a ``Trainer`` subclass.

    Takes arguments built by :func:`~zsam_hf.config.with_zsam_arguments` (the host's config plus
    the SAM fields); everything else is the host's constructor. Logs carry, next to ``loss``
    (the loss at w): ``perturbed_loss`` (at w + e), ``sharpness`` (their difference),
    ``perturbation_norm`` (||e||), for zsam ``zsam_kept_fraction``, all averaged over the
    two-pass steps, and ``sam_steps_fraction`` (the share of optimizer steps that took the
    two-pass step, 1 unless ``sam_interval`` > 1 or ``sam_start`` > 0).

    ``zsam_per_batch_state`` names the host's attributes that its loss updates once per batch
    (TRL's metric lists and token count): they are put back after the descent pass, so each
    micro-batch is counted once and described at w. A subclass with its own adds their names.
    """

    zsam_per_batch_state: tuple[str, ...] = ("_metrics", "_total_train_tokens")
    _zsam_arguments_class: type = None  # set by with_zsam; the default arguments class

    def __init__(self, *positional, **keywords):
        # The host's own signature says where ``args`` goes (DPOTrainer takes ref_model before it).
        bound = inspect.signature(super().__init__).bind_partial(*positional, **keywords)
        arguments_class = self._zsam_arguments_class or ZSAMTrainingArguments
        args = bound.arguments.get("args")
        if args is None:
            args = bound.arguments["args"] = arguments_class(output_dir="tmp_trainer")
        if not isinstance(args, ZSAMArgumentsMixin):
            raise TypeError(
                f"args must carry the SAM fields, got a plain {type(args).__name__}: build it with "
                f"{arguments_class.__name__} (zsam_hf.with_zsam returns it next to {type(self).__name__})."
            )
        # Once from the arguments (fail before any model work), once from what accelerate set up.
        requested_fsdp = int((args.fsdp_config or {}).get("version", 2)) if args.fsdp else None
        _check_backend(args, deepspeed=bool(args.deepspeed), fsdp_version=requested_fsdp)
        super().__init__(*bound.args, **bound.kwargs)
        _check_one_process_group(self.args)
        self._check_sam_arguments()
        self.perturbation = _perturbation_from(self.args)
        self._sharpness_meter = _SharpnessMeter()
        self._sharpness_logged_step: int | None = 0
        self._checkpoint_staging: str | None = None  # while a checkpoint is being staged
        self._push_deferred = False
        # What the model card should say beyond the Trainer's state; scripts fill it in:
        # dataset, dataset_display, eval_split, base_model, command, license, tags.
        self.model_card_info: dict = {}

    # ---- each train() call: this run's SAM settings, read from args now ----------------------
    def _check_sam_arguments(self) -> None:
        """The SAM fields as ``__post_init__`` checks them, and the backend they must run on."""
        self.args._validate_sam_fields()
        fsdp_version = self.accelerator.state.fsdp_plugin.fsdp_version if self.is_fsdp_enabled else None
        _check_backend(self.args, deepspeed=self.is_deepspeed_enabled, fsdp_version=fsdp_version)

    def _inner_training_loop(self, *args, **kwargs):
        """Start a run with the SAM settings ``args`` holds now (a search trial's, a user's change).

        Runs after the Trainer applied a trial's values and before it restores a checkpoint's
        optimizer state (where FSAM's average comes back): nothing carries over from an earlier
        ``train()`` (FSAM's average, reused buffers, the SAM meters).
        """
        self._check_sam_arguments()
        if self.args.sam_rho is None:  # None means the variant's default, as at construction
            self.args.sam_rho = DEFAULT_RHO[self.args.sam_variant]
        self.perturbation = _perturbation_from(self.args)
        self._sharpness_meter.reset()
        self._sharpness_logged_step = None  # the step training starts at, once the state is loaded
        return super()._inner_training_loop(*args, **kwargs)

    def _run_epoch(self, *args, **kwargs):
        if self._sharpness_logged_step is None:  # the SAM logs count from the step training starts at
            self._sharpness_logged_step = self.state.global_step
        return super()._run_epoch(*args, **kwargs)

    # ---- the two-pass step ----------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if not self.is_sharpness_step():
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        names, params = self._trainable_parameters(model)
        sharded = self.is_fsdp_enabled
        if sharded:  # both passes reduce-scatter, also inside the Trainer's accumulation no_sync
            model.set_requires_gradient_sync(True)

        # 1. ascent pass at w, RNG replayed afterwards so both passes see the same dropout
        no_sync = contextlib.nullcontext() if sharded else self.accelerator.no_sync(model)
        with no_sync, torch.random.fork_rng(devices=_rng_devices(model)):
            loss = self._loss_for_backward(model, inputs, num_items_in_batch)
            grads = self._ascent_gradients(loss, params)
        if not loss.requires_grad:  # no weight reaches the loss: nothing to climb nor to descend
            return loss.detach()
        # 2. climb to w + e (under FSDP2: each rank its slice, from full-tensor statistics)
        if sharded:
            numels = [p.numel() for p in params]
            applied, stats = self.perturbation.perturb(
                names, [_local(p) for p in params], grads, Shards(), numels, step=self.state.global_step
            )
        else:
            applied, stats = self.perturbation.perturb(names, params, grads, step=self.state.global_step)
        del grads
        # 3. descent pass at w + e (the host's own training step), 4. back to w exactly
        try:
            with running_stats_frozen(model), self._per_batch_state_kept():
                perturbed_loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            applied.restore()
        self._sharpness_meter.record(self.state.global_step, loss, perturbed_loss, stats)
        return loss.detach()

    @contextlib.contextmanager
    def _per_batch_state_kept(self):
        """Put back what the host's loss counts per batch, so the descent pass is not counted again."""
        saved = {
            name: copy.deepcopy(getattr(self, name))
            for name in self.zsam_per_batch_state
            if hasattr(self, name)
        }
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(self, name, value)

    def is_sharpness_step(self) -> bool:
        """Whether the optimizer step being computed takes the two-pass step.

        From step s = ``sam_start`` on (a fraction of ``state.max_steps`` rounded up), every
        ``sam_interval``-th step (s, s + k, s + 2k, ...), all its micro-batches; a pure function of
        ``state.global_step`` and ``state.max_steps``, so a resumed run takes the same steps.
        """
        if self.args.sam_variant == "none":
            return False
        since_start = self.state.global_step - self.args.sam_start_step(self.state.max_steps)
        return since_start >= 0 and since_start % self.args.sam_interval == 0

    def _trainable_parameters(self, model) -> tuple[list[str], list[torch.nn.Parameter]]:
        named = [
            (n, p) for n, p in self.accelerator.unwrap_model(model).named_parameters() if p.requires_grad
        ]
        return [n for n, _ in named], [p for _, p in named]

    def _loss_for_backward(self, model, inputs, num_items_in_batch) -> torch.Tensor:
        """The loss exactly as ``Trainer.training_step`` back-propagates it.

        Each pass gets a shallow copy of the inputs (``compute_loss`` may pop labels);
        the scaling for gradient accumulation follows the Trainer's own rule, so the
        ascent and descent losses are in the same units as the logged ``loss``.
        """
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)  # absent before transformers 5.2x
        if scaled_for_ga is None:
            scaled_for_ga = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        return loss if scaled_for_ga else loss / self.current_gradient_accumulation_steps

    def _ascent_gradients(self, loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """g = grad L_B(w), leaving ``.grad`` as it was; unscaled, optionally averaged over replicas.

        Taken through ``backward()``, the one gradient path that works whatever the model does in
        its forward (reentrant activation checkpoints refuse ``torch.autograd.grad``; sharded
        parameters do not take part in it), with each ``.grad`` set aside and put back.

        Under fp16 the loss is scaled by the GradScaler's current scale (so small
        gradients survive half precision) and divided back here by hand: the scaler's
        own ``unscale_`` is left for the descent gradient, never called twice.
        """
        if not params or not loss.requires_grad:
            return [None] * len(params)
        scaler = self.accelerator.scaler
        scaling = scaler is not None and scaler.is_enabled()
        target = scaler.scale(loss) if scaling else loss
        grads = [_local(g) for g in _gradients_through_backward(target, params)]
        present = [g for g in grads if g is not None]
        if scaling and present:  # scale() has initialized the scale tensor by now
            torch._foreach_mul_(present, scaler._get_scale_async().double().reciprocal().float())
        if (
            self.args.sam_sync_ascent
            and not self.is_fsdp_enabled  # FSDP2's reduce-scatter averaged it already
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            grads = all_reduce_mean(grads, params)
        return grads

    # ---- logs -------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.args.sam_variant != "none":
            logs.update(self._sharpness_logs())
        super().log(logs, start_time)

    def _sharpness_logs(self) -> dict[str, float]:
        """SAM metrics averaged over the two-pass steps since the last log, and their share.

        Every rank reaches this together and takes the same steps, so the gather is collective.
        """
        meter = self._sharpness_meter
        start = self.state.global_step if self._sharpness_logged_step is None else self._sharpness_logged_step
        steps = max(self.state.global_step - start, 1)
        logs = {"sam_steps_fraction": len(meter.sharpness_steps) / steps}
        if meter.sums is not None:
            sums = self.accelerator.gather(meter.sums[None]).mean(0).tolist()
            sharpness_steps = max(len(meter.sharpness_steps), 1)
            perturbed = sums[4] if sums[4] > 0 else 1.0
            logs.update(
                perturbed_loss=sums[1] / sharpness_steps,
                sharpness=(sums[1] - sums[0]) / sharpness_steps,
                perturbation_norm=sums[2] / perturbed,
            )
            if self.args.sam_variant in ("zsam", "random"):
                logs["zsam_kept_fraction"] = sums[3] / perturbed
        meter.reset()
        self._sharpness_logged_step = self.state.global_step
        return logs

    # ---- model card --------------------------------------------------------------------------
    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write README.md in ``output_dir``: SAM hyper-parameters, schedule, results, command, BibTeX.

        Called by ``push_to_hub`` like the Trainer's own; scripts call it after saving. The task
        (``tasks``, else read from the model's head) decides the pipeline tag and the model-index.
        """
        if not self.is_world_process_zero():
            return
        info = self.model_card_info
        model = self.accelerator.unwrap_model(self.model)
        extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
        task = (tasks if isinstance(tasks, str) else (tasks or [None])[0]) or task_of(model)
        base_model = finetuned_from or info.get("base_model", pretrained_name(model))
        context = CardContext(
            model_name=model_name or info.get("model_name") or Path(self.args.output_dir).name,
            sam=self.args.sam_hyperparameters(),
            training=card_training_rows(self.args, model, self.state.global_step),
            dataset=(dataset if isinstance(dataset, str) else None) or info.get("dataset"),
            dataset_display=info.get("dataset_display"),
            base_model=base_model,
            license=license or info.get("license", "apache-2.0"),
            metrics=card_metrics(self.state.log_history, info.get("eval_split", "validation")),
            command=info.get("command"),
            tags=[*info.get("tags", []), *extra_tags],
            task=task,
            trainer_name=type(self).__name__,
        )
        os.makedirs(self.args.output_dir, exist_ok=True)
        build_model_card(context).save(os.path.join(self.args.output_dir, "README.md"))


def _perturbation_from(args) -> SharpnessPerturbation:
    """A fresh perturbation engine with the SAM settings ``args`` holds now."""
    return SharpnessPerturbation(
        variant=args.sam_variant,
        rho=args.sam_rho,
        quantile=args.zsam_quantile,
        normalization=args.zsam_normalization,
        asam_eta=args.asam_eta,
        fsam_sigma=args.fsam_sigma,
        fsam_lambda=args.fsam_lambda,
        seed=args.seed,
        capturable=args.sam_capturable,
    )


def _check_one_process_group(args) -> None:
    """Refuse a launch whose environment says several processes but whose Trainer sees one.

    Each such process would train alone and own ``output_dir``, and they would overwrite each
    other's checkpoints (``accelerate launch`` with a CPU config and no process group does this).
    """
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and args.world_size == 1:
        raise RuntimeError(
            f"This process was launched as one of WORLD_SIZE={launched} processes, but the Trainer sees "
            f"world_size={args.world_size} (process_index={args.process_index}): no process group joins "
            f"them, so each of the {launched} would train alone and write the same output_dir. On CPUs "
            f"launch with `accelerate launch --multi_gpu --use_cpu --num_processes {launched} ...` or "
            f"`torchrun --nproc_per_node {launched} ...`; on GPUs, `accelerate launch --multi_gpu`."
        )


def _check_backend(args, deepspeed: bool, fsdp_version: int | None) -> None:
    """Refuse, with what to use instead, the engines the two-pass step cannot run on."""
    if args.sam_variant == "none":
        return
    if deepspeed:
        raise ValueError(
            f"The two-pass step does not support DeepSpeed (sam_variant={args.sam_variant!r}). To shard a model that "
            "does not fit one GPU, use FSDP2: TrainingArguments(fsdp=True, fsdp_config={'fsdp_version': 2}) or "
            "an accelerate FSDP2 config; otherwise DDP (accelerate launch --multi_gpu, torchrun), or "
            "sam_variant='none' for the plain Trainer."
        )
    if fsdp_version is None:
        return
    if fsdp_version != 2:
        raise ValueError(
            f"The two-pass step supports FSDP version 2 only, got fsdp_version={fsdp_version}: set "
            "fsdp_config={'fsdp_version': 2} (transformers' default), or use DDP."
        )
    if args.sam_variant == "random":
        raise ValueError(
            "sam_variant='random' (the random-mask control) is not supported under FSDP2: drawing one mask "
            "per full tensor from sharded slices exactly is not implemented. Run the control under DDP or "
            "on one device."
        )
    if args.sam_capturable:
        raise ValueError(
            "sam_capturable=True is not supported under FSDP2: the ascent without host synchronization "
            "points whole parameters at buffers, and FSDP2's are slices of sharded ones. Leave it False."
        )
    if args.sam_sync_ascent is False:
        raise ValueError(
            "sam_sync_ascent=False cannot hold under FSDP: every rank all-gathers the same weights, so the "
            "ascent gradient is necessarily the one averaged over ranks (sam_sync_ascent=True). Leave "
            "sam_sync_ascent unset (None), or set it to True."
        )


def _gradients_through_backward(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """grad of ``loss`` via ``.backward()``, leaving each ``.grad`` as it was before.

    The earlier micro-batches' descent gradients (gradient accumulation) are set aside, not
    copied, while the ascent gradient fills ``.grad``; then they are put back.
    """
    stashed = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss.backward()
        grads = [p.grad for p in params]
    finally:
        for p, grad in zip(params, stashed):
            p.grad = grad
    return grads


@torch.no_grad()
def _local(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's slice of a sharded (DTensor) parameter or gradient, sharing its storage; others as they are.

    Taken without autograd, so the slice is a plain tensor the perturbation may write in place.
    """
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _on(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A figure to add into a meter tensor: a device tensor in the meter's dtype, or a plain number."""
    return value.to(like) if isinstance(value, torch.Tensor) else value


def _rng_devices(model: torch.nn.Module) -> list[int]:
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cuda":
        return [param.device.index if param.device.index is not None else torch.cuda.current_device()]
    return []
