"""A training run's life around its steps: which checkpoint it resumes from, who owns the output
directory, checkpoints that appear whole or not at all, FSAM's saved state, a rerun that finds the
work done.

``CheckpointLifecycleMixin`` sits under :class:`~zsam_hf.mixin.ZSAMTrainerMixin`, above the host
Trainer: every method defers to the host through ``super()``. The file-system rules are in
``checkpoint_dirs.py`` (staging, manifests, rotation) and ``run_lock.py`` (one writer per output
directory); here they meet the Trainer's hooks.
"""

from __future__ import annotations

import logging
import os

import torch

from . import checkpoint_dirs, run_lock
from .checkpoints import check_adapter_checkpoint, is_peft_model, load_checkpoint_weights

SAM_STATE_FILE = "sam_state_rank{rank}.pt"
logger = logging.getLogger(__name__)


class CheckpointLifecycleMixin:
    """Resume, output-directory ownership, staged checkpoints and the rerun of a finished job."""

    # ---- starting: what to resume from, and who writes the output directory --------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, *args, **kwargs):
        """The Trainer's ``train``, resuming from the newest *complete* checkpoint.

        ``resume_from_checkpoint=True`` skips (and names) checkpoints whose save was interrupted;
        a named checkpoint that is missing, not a checkpoint or incomplete is refused before
        training starts, in the Trainer's own words plus what is wrong. Staging directories left
        by a killed save are removed. The world's first process holds the run directory's lock
        (``run_lock.py``) while it trains: a second live job writing there is refused.
        """
        resume = self._resolve_resume(resume_from_checkpoint)
        # The world's first process holds it (with save_on_each_node every node's first process saves, and
        # on a shared file system they would refuse each other).
        lock = run_lock.acquire(self._run_directory(trial)) if self.is_world_process_zero() else None
        try:
            return super().train(resume, trial, *args, **kwargs)
        finally:
            if lock is not None:
                lock.release()

    def _run_directory(self, trial) -> str:
        """Where this run writes its checkpoints: ``output_dir``, or a search trial's own directory."""
        if trial is None or getattr(self, "hp_search_backend", None) is None:
            return self.args.output_dir
        return super()._get_output_dir(trial)

    def _resolve_resume(self, resume_from_checkpoint: str | bool | None) -> str | None:
        output_dir = self.args.output_dir
        if self.args.should_save:
            for leftover in checkpoint_dirs.remove_leftovers(output_dir):
                logger.warning("Removed %s: a checkpoint save that was interrupted.", leftover)
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            return None
        if resume_from_checkpoint is True:
            search = checkpoint_dirs.find_newest_complete(output_dir)
            if self.is_world_process_zero():
                checkpoint_dirs.log_skipped(search)
            if search.newest is None:
                skipped = f" (incomplete: {', '.join(search.skipped)})" if search.skipped else ""
                raise checkpoint_dirs.IncompleteCheckpointError(
                    f"No valid checkpoint found in output directory ({output_dir}): resume_from_checkpoint=True, "
                    f"but output_dir={output_dir!r} holds no complete checkpoint{skipped}. Leave "
                    "resume_from_checkpoint unset to start from scratch."
                )
            logger.info("Resuming from %s, the newest complete checkpoint.", search.newest)
            return search.newest
        checkpoint = os.fspath(resume_from_checkpoint)
        checkpoint_dirs.require_complete(checkpoint)
        return checkpoint

    # ---- a rerun of a job that already reached max_steps --------------------------------------
    def _run_epoch(self, *args, **kwargs):
        """The Trainer's epoch, unless the run already took all its steps.

        Resumed from ``checkpoint-<max_steps>`` (a finished job run again, or one killed between its
        last checkpoint and its final save), the Trainer would take one more step and save
        ``checkpoint-<max_steps + 1>``. Here it takes none and goes straight to the end of training
        (metrics, best model, ``on_train_end``), and the caller's final save writes the same weights.
        """
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            logger.info(
                "The run already reached max_steps=%d (global step %d): no step to take.",
                self.state.max_steps,
                self.state.global_step,
            )
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    # ---- checkpoints that appear whole or not at all (see checkpoint_dirs.py) -----------------
    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into a staging directory and renamed into place whole.

        Every rank writes its part (RNG state, FSAM's average, FSDP2 shards) into the same staging
        directory; after a barrier the process that owns the output directory flushes the files,
        writes the manifest and renames; a second barrier keeps every rank behind the rename.
        """
        run_dir = self._get_output_dir(trial=trial)
        owner = self.args.should_save
        barrier = self.accelerator.wait_for_everyone
        with checkpoint_dirs.staged_checkpoint(run_dir, self.state.global_step, owner, barrier) as checkpoint:
            self._checkpoint_staging, self._push_deferred = checkpoint.root, False
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._checkpoint_staging = None
            best = self.state.best_model_checkpoint
            if best is not None and os.path.normpath(best) == os.path.normpath(checkpoint.staged):
                self.state.best_model_checkpoint = checkpoint.final  # the state must name where it will live
                if owner:
                    self.state.save_to_json(
                        os.path.join(checkpoint.staged, checkpoint_dirs.TRAINER_STATE_NAME)
                    )
        if self._push_deferred:
            super()._push_from_checkpoint(checkpoint.final)
        if owner:
            checkpoint_dirs.rotate(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is staged, the Trainer's own save code writes into the staging root.
        if getattr(self, "_checkpoint_staging", None) is not None:
            return self._checkpoint_staging
        return super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Pushed once the checkpoint is in place, never from the staging directory.
        if getattr(self, "_checkpoint_staging", None) is not None:
            self._push_deferred = True
            return
        super()._push_from_checkpoint(checkpoint_folder)

    # ---- checkpoints: weights restored whole; FSAM's EMA travels with the optimizer state --
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume with every tensor restored (see ``checkpoints.py``), or fail naming the mismatch."""
        self._load_weights_whole(resume_from_checkpoint, model, super()._load_from_checkpoint)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end`` with every tensor restored, like resume."""
        checkpoint = self.state.best_model_checkpoint
        logger.info("Loading best model from %s (score: %s).", checkpoint, self.state.best_metric)
        self._load_weights_whole(
            checkpoint, None, lambda *_: super(CheckpointLifecycleMixin, self)._load_best_model()
        )

    def _load_weights_whole(self, checkpoint: str, model, trainer_loader) -> None:
        model = self.model if model is None else model
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:  # sharded states: the backend's own loader
            trainer_loader(checkpoint, model)
        elif is_peft_model(model):  # the adapter alone is saved; PEFT's load_adapter reads it
            check_adapter_checkpoint(model, checkpoint)
            trainer_loader(checkpoint, model)
        else:
            load_checkpoint_weights(model, checkpoint)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.perturbation.ema:
            os.makedirs(output_dir, exist_ok=True)
            path = os.path.join(output_dir, SAM_STATE_FILE.format(rank=self.args.process_index))
            torch.save(self.perturbation.state_dict(), path)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        # Fewer state files than ranks under DDP: share rank 0's (replicas hold the same average).
        # Under FSDP2 each rank's average is its own slice: only its own file will do.
        ranks = (self.args.process_index,) if self.is_fsdp_enabled else (self.args.process_index, 0)
        for rank in ranks:
            path = os.path.join(checkpoint, SAM_STATE_FILE.format(rank=rank))
            if os.path.isfile(path):
                self.perturbation.load_state_dict(
                    torch.load(path, weights_only=True), device=self.args.device
                )
                return
