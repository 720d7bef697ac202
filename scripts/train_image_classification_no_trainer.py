#!/usr/bin/env python
"""Train an image classifier with the ZSAM optimizer in one visible accelerate loop (no Trainer).

The shape of transformers' ``run_image_classification_no_trainer.py``, on the same data, models and
transforms as ``train_image_classification.py`` (``zsam_hf.vision``):

    python scripts/train_image_classification_no_trainer.py                 # offline Fashion-MNIST subset
    accelerate launch --multi_gpu --num_processes 8 scripts/train_image_classification_no_trainer.py ...
    torchrun --nproc_per_node 2 scripts/train_image_classification_no_trainer.py ...   # 2 gloo processes on CPU

Each micro-batch: the ascent inside ``zsam.ascent()`` (and ``no_sync``: each replica climbs with its
own gradient unless --sam_sync_ascent), the descent through ``accelerator.backward`` at w + e, back to
w, then accelerate's clipping and step on the last micro-batch of each step. Checkpoints are
``accelerator.save_state`` directories written whole or not at all (staged, then renamed); running
the same command again resumes from the newest complete one.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from zsam_hf import ZSAM, checkpoint_dirs
from zsam_hf.card import CardContext, build_model_card, card_metrics, redact_command
from zsam_hf.vision.image_classification import DataArguments, ModelArguments, end_process_group, prepare_data

DEMO = ["--dataset_name", "fashion_mnist", "--max_train_samples", "6000", "--max_eval_samples", "2000",
        "--num_train_epochs", "2", "--output_dir", "outputs/zsam-no-trainer-demo"]  # fmt: skip


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_name", default="fashion_mnist")
    p.add_argument("--model_name_or_path", default="cifar_resnet20")
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--output_dir", default="outputs/zsam-no-trainer")
    p.add_argument("--per_device_train_batch_size", type=int, default=128)
    p.add_argument("--per_device_eval_batch_size", type=int, default=256)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=5e-4)
    p.add_argument("--num_train_epochs", type=int, default=3)
    p.add_argument("--lr_scheduler_type", default="cosine")
    p.add_argument("--num_warmup_steps", type=int, default=0)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--checkpointing_steps", default="epoch", help="'epoch', or save every N optimizer steps")
    p.add_argument("--no_augment", action="store_true")
    p.add_argument("--sam_variant", default="zsam", choices=["zsam", "sam", "asam", "fsam"])
    p.add_argument("--sam_rho", type=float, default=None)
    p.add_argument("--zsam_quantile", type=float, default=0.95)
    p.add_argument("--zsam_normalization", default="global", choices=["global", "tensor"])
    p.add_argument("--sam_sync_ascent", action="store_true", help="average the ascent gradient over replicas")
    args = p.parse_args(argv)
    if args.checkpointing_steps != "epoch" and not args.checkpointing_steps.isdigit():
        p.error(
            f"--checkpointing_steps {args.checkpointing_steps!r} is invalid: expected 'epoch' or a number"
        )
    return args


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int) -> None:
    """accelerator.save_state into a staging directory, renamed to checkpoint-<step> once complete."""
    owner, barrier = accelerator.is_main_process, accelerator.wait_for_everyone
    with checkpoint_dirs.staged_checkpoint(output_dir, step, owner, barrier) as checkpoint:
        accelerator.save_state(checkpoint.staged)


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, loader) -> float:
    model.eval()
    correct = total = 0
    for batch in loader:
        logits = model(**batch)["logits"]
        predictions, labels = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    model.train()
    return correct / max(total, 1)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv) or DEMO
    args = parse(argv)
    # On a machine without an accelerator, cpu=True lets torchrun's processes form a gloo group.
    on_cpu = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, cpu=on_cpu)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        checkpoint_dirs.remove_leftovers(args.output_dir)
    accelerator.wait_for_everyone()
    resume = checkpoint_dirs.last_complete_checkpoint(args.output_dir)

    # ---- data, model, transforms (as the Trainer script) ----
    data = prepare_data(
        ModelArguments(model_name_or_path=args.model_name_or_path),
        DataArguments(dataset_name=args.dataset_name, max_train_samples=args.max_train_samples,
                      max_eval_samples=args.max_eval_samples, augment=not args.no_augment),
        seed=args.seed,
    )  # fmt: skip
    model = data.built.model
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(
        data.train, batch_size=args.per_device_train_batch_size, shuffle=True, generator=generator
    )
    eval_loader = torch.utils.data.DataLoader(data.eval, batch_size=args.per_device_eval_batch_size)

    # ---- the ZSAM optimizer and the schedule ----
    zsam = ZSAM(
        model.named_parameters(), torch.optim.AdamW, variant=args.sam_variant, rho=args.sam_rho,
        quantile=args.zsam_quantile, normalization=args.zsam_normalization, sync_ascent=args.sam_sync_ascent,
        lr=args.learning_rate, weight_decay=args.weight_decay,
    )  # fmt: skip
    steps_per_epoch = math.ceil(
        len(train_loader) / accelerator.num_processes / args.gradient_accumulation_steps
    )
    max_steps = args.num_train_epochs * steps_per_epoch
    scheduler = get_scheduler(
        args.lr_scheduler_type, optimizer=zsam, num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )  # fmt: skip
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, zsam, train_loader, eval_loader, scheduler
    )

    # ---- resume ----
    completed, first_epoch, skip = 0, 0, 0
    if resume is not None:
        accelerator.print(f"Resuming from {resume}")
        accelerator.load_state(resume)
        completed = int(resume.rsplit("-", 1)[1])
        first_epoch, done_in_epoch = divmod(completed, steps_per_epoch)
        skip = done_in_epoch * args.gradient_accumulation_steps

    # ---- train ----
    progress = tqdm(total=max_steps, initial=completed, disable=not accelerator.is_local_main_process)
    for epoch in range(first_epoch, args.num_train_epochs):
        data.augmentation.epoch = epoch
        model.train()
        loader = (
            accelerator.skip_first_batches(train_loader, skip)
            if epoch == first_epoch and skip
            else train_loader
        )
        for batch in loader:
            with accelerator.accumulate(model):
                with zsam.ascent(), accelerator.no_sync(model):  # g at w, this micro-batch alone
                    loss = model(**batch)["loss"]
                    accelerator.backward(loss)
                accelerator.backward(model(**batch)["loss"])  # g' at w + e, accumulated
                zsam.restore()  # back to w
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                completed += 1
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch)
                steps = args.checkpointing_steps
                if steps != "epoch" and completed % int(steps) == 0:
                    save_checkpoint(accelerator, args.output_dir, completed)
        accuracy = evaluate(accelerator, model, eval_loader)
        accelerator.print(f"epoch {epoch}: eval_accuracy {accuracy:.4f}")
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, args.output_dir, completed)
    progress.close()

    # ---- save the model, its image processor and its card ----
    accelerator.wait_for_everyone()
    accuracy = evaluate(accelerator, model, eval_loader)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(args.output_dir)
        if data.built.image_processor is not None:
            data.built.image_processor.save_pretrained(args.output_dir)
        hyperparameters = {"sam_variant": args.sam_variant, "sam_rho": zsam.perturbation.rho,
                           "sam_sync_ascent": args.sam_sync_ascent}  # fmt: skip
        if args.sam_variant == "zsam":
            hyperparameters.update(
                zsam_quantile=args.zsam_quantile, zsam_normalization=args.zsam_normalization
            )
        training = {"optimizer": "ZSAM over torch.optim.AdamW", "learning_rate": args.learning_rate,
                    "weight_decay": args.weight_decay, "lr_scheduler_type": args.lr_scheduler_type,
                    "train_batch_size (per device)": args.per_device_train_batch_size,
                    "gradient_accumulation_steps": args.gradient_accumulation_steps,
                    "num_devices": accelerator.num_processes, "num_epochs": args.num_train_epochs,
                    "max_grad_norm": args.max_grad_norm, "mixed_precision": accelerator.mixed_precision,
                    "seed": args.seed, "optimizer steps run": completed}  # fmt: skip
        card = build_model_card(
            CardContext(
                model_name=os.path.basename(os.path.normpath(args.output_dir)), sam=hyperparameters,
                training=training, dataset=data.dataset_id, dataset_display=data.dataset_display,
                base_model=data.built.base_model,
                metrics=card_metrics([{"eval_accuracy": accuracy}], data.eval_name),
                command=redact_command(["python", *sys.argv[:1], *argv]), task="image-classification",
                trainer_name="ZSAM optimizer (accelerate loop)",
            )
        )  # fmt: skip
        card.save(os.path.join(args.output_dir, "README.md"))
        print(f"eval_accuracy: {accuracy:.4f}")
        print(f"Model, image processor and model card saved to {args.output_dir}")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        end_process_group()  # once main() has dropped the accelerator and its DDP-wrapped model
    sys.exit(code)
