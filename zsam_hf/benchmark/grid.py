"""A resumable grid of SAM variants x models x seeds, on the same training path as the script.

Each run is an ordinary :func:`zsam_hf.image_classification.build_trainer` Trainer (same
data, models, transforms and ZSAMTrainer), given the released code's optimizer and
schedule: Adam with L2 weight decay, linear warm-up, then StepLR.  A finished run is
appended to ``results.jsonl``; a restarted grid skips it, and a run killed halfway
resumes from its last epoch checkpoint (it is never counted before it finishes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers.trainer_callback import PrinterCallback

from ..checkpoint_dirs import last_complete_checkpoint
from ..config import ZSAMTrainingArguments
from ..vision.image_classification import DataArguments, ModelArguments, build_trainer
from .hessian import model_sharpness

# variant label -> ZSAMTrainingArguments fields
VARIANTS = {
    "none": dict(sam_variant="none"),
    "sam": dict(sam_variant="sam"),
    "asam": dict(sam_variant="asam"),
    "fsam": dict(sam_variant="fsam"),
    "zsam-tensor": dict(sam_variant="zsam", zsam_normalization="tensor"),
    "zsam-global": dict(sam_variant="zsam", zsam_normalization="global"),
}
# Late-phase SAM: the two-pass step only over the last part of the run ("zsam-global-start0.75").
SAM_STARTS = (0.5, 0.75)
VARIANTS.update(
    {
        f"{label}-start{s}": {**VARIANTS[label], "sam_start": s}
        for label in ("zsam-global",)
        for s in SAM_STARTS
    }
)
# The same methods taking the two-pass step only every k-th optimizer step ("sam-k5", ...).
SAM_INTERVALS = (2, 5, 10)
VARIANTS.update(
    {
        f"{label}-k{k}": {**VARIANTS[label], "sam_interval": k}
        for label in ("sam", "zsam-global")
        for k in SAM_INTERVALS
    }
)

# Matched radius. The released code's per-tensor normalization gives each weight tensor an e of norm
# rho, so on ResNet-20 (20 weight tensors) the whole e has norm about rho sqrt(20) = 0.224, 4.5x SAM's:
# SAM and global ZSAM at that radius tell the filter's effect from the radius's.
MATCHED_RHO = 0.224


def at_matched_radius(label: str) -> str:
    """The name of variant ``label`` run at MATCHED_RHO ("sam-rho0.224")."""
    return f"{label}-rho{MATCHED_RHO:g}"


VARIANTS.update(
    {
        at_matched_radius(label): {**VARIANTS[label], "sam_rho": MATCHED_RHO}
        for label in ("sam", "zsam-global")
    }
)
# The controls of the filter study (controls.py): random masks at ZSAM's density, SAM split per tensor,
# and the random control at the radius and normalization ZSAM selected (given as overrides).
VARIANTS.update(
    {
        "sam-tensor": dict(sam_variant="sam", zsam_normalization="tensor"),
        "random-global": dict(sam_variant="random", zsam_normalization="global"),
        "random-tensor": dict(sam_variant="random", zsam_normalization="tensor"),
        "random-matched": dict(sam_variant="random"),
    }
)


@dataclass
class Budget:
    """What every run of the grid trains with (the released code's recipe, scaled to a budget)."""

    dataset_name: str = "fashion_mnist"
    epochs: float = 200
    max_train_samples: int | None = None
    eval_samples_per_epoch: int | None = None  # test images evaluated after each epoch (curves)
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 5e-5  # L2, as torch.optim.Adam applies it
    warmup_epochs: float = 5
    step_epochs: float = 30
    gamma: float = 0.75
    rho: float | None = None  # None: the variant's default (0.05; ASAM 0.5)
    quantile: float = 0.95
    num_workers: int = 0
    label_noise: float = 0.0  # fraction of training labels made uniformly random (fixed per seed)
    schedule: str = "released"  # "released" (warm-up, then StepLR) or "cosine" (warm-up, then cosine to 0)
    augment: bool = True  # the training script's random crop and flip
    # Score on a validation split carved from the training pool, labelled with the training noise (its
    # first ``validation_samples`` images); the test split, clean and whole, is evaluated at the end.
    validation: bool = False
    validation_samples: int = 2000

    def key(self) -> str:
        fields = asdict(self)
        # budgets from before these fields existed keep their keys (and so their results)
        for name, default in (
            ("label_noise", 0.0),
            ("schedule", "released"),
            ("augment", True),
            ("validation", False),
            ("validation_samples", 2000),
        ):
            if fields[name] == default:
                del fields[name]
        return json.dumps(fields, sort_keys=True)


@dataclass
class RunSpec:
    model: str
    variant: str
    seed: int
    budget: Budget
    overrides: dict = field(default_factory=dict)  # e.g. {"zsam_quantile": 0.9} in the sweep
    group: str = "grid"

    @property
    def name(self) -> str:
        extra = "".join(f"-{k}={v}" for k, v in sorted(self.overrides.items()))
        return f"{self.group}-{self.model}-{self.variant}{extra}-seed{self.seed}"

    def key(self) -> str:
        return json.dumps(
            {
                "model": self.model,
                "variant": self.variant,
                "seed": self.seed,
                "overrides": self.overrides,
                "group": self.group,
                "budget": json.loads(self.budget.key()),
            },
            sort_keys=True,
        )


def released_code_schedule(optimizer, steps_per_epoch: int, budget: Budget):
    """Linear warm-up over ``warmup_epochs``, then x ``gamma`` every ``step_epochs`` epochs."""
    warmup = budget.warmup_epochs * steps_per_epoch
    step = max(1, budget.step_epochs * steps_per_epoch)

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return budget.gamma ** math.floor((s - warmup) / step)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cosine_schedule(optimizer, total_steps: int, steps_per_epoch: int, budget: Budget):
    """Linear warm-up over ``warmup_epochs``, then cosine decay to 0 at the last step."""
    warmup = budget.warmup_epochs * steps_per_epoch

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total_steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def flatness(model, dataset, radii: list[float], directions: int, seed: int, batch_size: int = 500) -> dict:
    """Mean loss increase under random weight perturbations of relative norm r, per radius.

    Each direction draws Gaussian noise per weight tensor, scaled to r times that tensor's
    norm (filter-wise scale invariance aside, the usual "random direction" sharpness);
    the model is in eval mode (running BatchNorm statistics) and w is restored exactly.
    """
    model.eval()
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    batches = [{k: v.to(device) for k, v in b.items()} for b in loader]

    def loss() -> float:
        total = sum(model(**b).loss.item() * len(b["labels"]) for b in batches)
        return total / sum(len(b["labels"]) for b in batches)

    base = loss()
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    result = {"loss": base}
    for r in radii:
        increases = []
        for _ in range(directions):
            for p, w in zip(params, saved):
                noise = torch.randn(w.shape, generator=gen).to(device)
                p.copy_(w + noise * (r * w.norm() / (noise.norm() + 1e-12)))
            increases.append(loss() - base)
        for p, w in zip(params, saved):
            p.copy_(w)
        result[f"flatness@{r}"] = statistics.mean(increases)
    return result


def _summarize_logs(log_history: list[dict]) -> dict:
    """Curves and averages the benchmark keeps from a run's Trainer logs."""
    train = [h for h in log_history if "loss" in h and "eval_loss" not in h]
    evals = [h for h in log_history if "eval_accuracy" in h]
    out = {
        "curve_epoch": [h["epoch"] for h in evals],
        "curve_test_accuracy": [h["eval_accuracy"] for h in evals],
        "curve_test_loss": [h["eval_loss"] for h in evals],
        "best_epoch_test_accuracy": max((h["eval_accuracy"] for h in evals), default=None),
        "train_loss": train[-1]["loss"] if train else None,
    }
    for key in ("sharpness", "perturbation_norm", "zsam_kept_fraction", "sam_steps_fraction"):
        values = [h[key] for h in train if key in h]
        if values:
            out[f"mean_{key}"] = statistics.mean(values)
    return out


@dataclass
class HessianBudget:
    """The Hessian figures of each trained model: on ``samples`` clean training images (0: none)."""

    samples: int = 0
    iterations: int = 20
    tolerance: float = 1e-3
    trace_samples: int = 10
    batch_size: int = 128


def weights_digest(model) -> str:
    """A short hash of the model's weights and buffers, to show that the variants of one seed
    start from the same initial weights (every record carries its own)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def hessian_figures(model, train_images, budget: HessianBudget, seed: int) -> dict:
    if budget.samples <= 0:
        return {}
    device = next(model.parameters()).device
    subset = train_images.select(range(min(budget.samples, len(train_images))))
    loader = torch.utils.data.DataLoader(subset, batch_size=budget.batch_size)
    batches = [{k: v.to(device) for k, v in b.items()} for b in loader]
    start = time.perf_counter()
    result = model_sharpness(
        model, batches, budget.iterations, budget.tolerance, budget.trace_samples, seed=2000 + seed
    )
    return {
        "hessian_top_eigenvalue": result.top_eigenvalue,
        "hessian_power_iterations": result.power_iterations,
        "hessian_trace": result.trace,
        "hessian_trace_stderr": result.trace_stderr,
        "hessian_samples": len(subset),
        "hessian_time_s": time.perf_counter() - start,
    }


def train_accuracies(trainer, built) -> dict:
    """Accuracy on the training images (no augmentation): against their true labels, and against the
    labels trained on (they differ under label noise: fitting those is memorizing the noise)."""
    logits = trainer.predict(built.train_images, metric_key_prefix="train_images").predictions
    predicted = torch.as_tensor(logits[0] if isinstance(logits, tuple) else logits).argmax(-1)
    true, trained = torch.as_tensor(built.train_true_labels), torch.as_tensor(built.train_labels)
    return {
        "train_accuracy_true_labels": (predicted == true).float().mean().item(),
        "train_accuracy_trained_labels": (predicted == trained).float().mean().item(),
    }


def run_one(
    spec: RunSpec,
    root: str,
    flatness_radii,
    flatness_directions: int,
    flatness_samples: int,
    hessian: HessianBudget | None = None,
) -> dict:
    """Train one cell of the grid (resuming its checkpoint if any) and measure it."""
    budget = spec.budget
    run_dir = os.path.join(root, "runs", spec.name)
    fields = dict(VARIANTS[spec.variant])
    fields.update(spec.overrides)
    if budget.rho is not None and "sam_rho" not in spec.overrides and spec.variant != "asam":
        fields["sam_rho"] = budget.rho
    if fields.get("sam_variant") in ("zsam", "random"):
        fields.setdefault("zsam_quantile", budget.quantile)
    args = ZSAMTrainingArguments(
        output_dir=run_dir,
        seed=spec.seed,
        data_seed=spec.seed,
        num_train_epochs=budget.epochs,
        per_device_train_batch_size=budget.batch_size,
        per_device_eval_batch_size=500,
        learning_rate=budget.learning_rate,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        logging_strategy="epoch",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=budget.num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        **fields,
    )
    data_args = DataArguments(
        dataset_name=budget.dataset_name,
        eval_split="auto" if budget.validation else "test",
        eval_label_noise=budget.validation,
        max_train_samples=budget.max_train_samples,
        train_label_noise=budget.label_noise,
        augment=budget.augment,
    )
    built = build_trainer(ModelArguments(model_name_or_path=spec.model), data_args, args)
    trainer = built.trainer
    initial_weights = weights_digest(trainer.model)
    trainer.remove_callback(PrinterCallback)  # the grid prints one line per run instead
    validation = None
    if budget.validation:  # curves and the validation score on the noisy held-out split; test at the end
        validation = trainer.eval_dataset.select(
            range(min(budget.validation_samples, len(trainer.eval_dataset)))
        )
        trainer.eval_dataset, full_test = validation, built.test
    else:
        full_test = trainer.eval_dataset
    if budget.eval_samples_per_epoch:
        trainer.eval_dataset = full_test.select(range(min(budget.eval_samples_per_epoch, len(full_test))))
    steps_per_epoch = math.ceil(len(trainer.train_dataset) / (budget.batch_size * max(1, args.world_size)))
    trainer.optimizer = torch.optim.Adam(
        trainer.model.parameters(),
        lr=budget.learning_rate,
        betas=(0.9, 0.999),
        weight_decay=budget.weight_decay,
    )
    if budget.schedule == "cosine":
        total = math.ceil(budget.epochs * steps_per_epoch)
        trainer.lr_scheduler = cosine_schedule(trainer.optimizer, total, steps_per_epoch, budget)
    else:
        trainer.lr_scheduler = released_code_schedule(trainer.optimizer, steps_per_epoch, budget)

    start = time.perf_counter()
    checkpoint = last_complete_checkpoint(run_dir)
    train_output = trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.perf_counter() - start
    final = trainer.evaluate(full_test, metric_key_prefix="final")
    scored = {}
    if validation is not None:
        scored = trainer.evaluate(validation, metric_key_prefix="validation")
        scored = {"validation_accuracy": scored["validation_accuracy"], "validation_samples": len(validation)}
    flat_set = full_test.select(range(min(flatness_samples, len(full_test))))
    flat = flatness(trainer.model, flat_set, flatness_radii, flatness_directions, seed=1000 + spec.seed)
    measured = {
        **train_accuracies(trainer, built),
        **hessian_figures(trainer.model, built.train_images, hessian or HessianBudget(), spec.seed),
    }
    record = {
        "name": spec.name,
        "group": spec.group,
        "model": spec.model,
        "variant": spec.variant,
        "seed": spec.seed,
        "initial_weights": initial_weights,
        "overrides": spec.overrides,
        "sam_interval": args.sam_interval,
        "sam_start": args.sam_start,
        "label_noise": budget.label_noise,
        "train_samples": len(built.train_labels),
        "epochs": budget.epochs,
        "final_test_accuracy": final["final_accuracy"],
        "final_test_loss": final["final_loss"],
        "final_test_top5_accuracy": final.get("final_top5_accuracy"),
        **scored,
        "sam_rho": args.sam_rho if args.sam_variant != "none" else None,
        "zsam_normalization": args.zsam_normalization,
        "train_loss_mean": train_output.training_loss,
        "wall_time_s": wall,
        "resumed": checkpoint is not None,
        "steps": trainer.state.global_step,
        "device": str(trainer.args.device),
        **_summarize_logs(trainer.state.log_history),
        **{k: v for k, v in flat.items() if k.startswith("flatness")},
        **measured,
        "budget": asdict(budget),
        "key": spec.key(),
    }
    best = record["best_epoch_test_accuracy"]
    record["best_test_accuracy"] = max(record["final_test_accuracy"], best) if best is not None else None
    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints were only for resuming this run
    return record


def load_results(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_result(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_grid(
    specs: list[RunSpec],
    root: str,
    flatness_radii,
    flatness_directions: int,
    flatness_samples: int,
    log=print,
    hessian: HessianBudget | None = None,
    shard: tuple[int, int] = (0, 1),
):
    """Run every spec not yet in ``root/results.jsonl``; returns all results.

    ``shard=(k, n)`` runs only the specs whose position in the list is k modulo n, so n processes
    (one core each) can share a grid; each appends its finished runs to the same results file.
    """
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "results.jsonl")
    done = {r["key"] for r in load_results(path)}
    for i, spec in enumerate(specs, 1):
        if (i - 1) % shard[1] != shard[0]:
            continue
        if spec.key() in done:
            log(f"[{i}/{len(specs)}] {spec.name}: done already, skipped")
            continue
        log(f"[{i}/{len(specs)}] {spec.name}: training")
        record = run_one(spec, root, flatness_radii, flatness_directions, flatness_samples, hessian)
        append_result(path, record)
        log(
            f"[{i}/{len(specs)}] {spec.name}: test accuracy {record['final_test_accuracy']:.4f} "
            f"in {record['wall_time_s']:.0f} s"
        )
    return load_results(path)
