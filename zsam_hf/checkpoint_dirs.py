"""Checkpoint directories that appear whole or not at all, and finding the newest whole one.

transformers' Trainer writes ``checkpoint-N`` in place, and ``get_last_checkpoint`` returns the
highest-numbered directory, complete or not: a job killed while it saves (SIGKILL from a spot
preemption, a SLURM time limit, the OOM killer) leaves a directory that resume then fails on.

Here a checkpoint is written into ``_staging-checkpoint-N/checkpoint-N`` next to its final
place, every file is flushed to disk, a manifest (every file and its size) is written last,
and the directory is renamed to ``checkpoint-N`` in one atomic step. A ``checkpoint-N`` is
therefore complete by construction; the manifest also catches a file lost or truncated later.

Pure file-system code: no torch, no transformers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR
MANIFEST_NAME = "checkpoint_manifest.json"
TRAINER_STATE_NAME = "trainer_state.json"
STAGING_PREFIX = "_staging-"  # a leading "_" keeps it out of Hub uploads (the Trainer ignores "_*")
REPLACED_PREFIX = "_replaced-"
_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
# Shards of weights saved in pieces: model-00001-of-00002.safetensors, pytorch_model-00001-of-00002.bin
_WEIGHT_SHARD = re.compile(r"^(model|pytorch_model|adapter_model)-\d+-of-\d+\.(safetensors|bin)$")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


class IncompleteCheckpointError(ValueError):
    """A checkpoint directory that cannot be resumed from (the message names what is wrong)."""


# ---- writing ------------------------------------------------------------------------------
def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}-{step}"


def staging_root(run_dir: str, step: int) -> str:
    """The directory a checkpoint is staged in; the Trainer writes ``<root>/checkpoint-N`` inside it."""
    return os.path.join(run_dir, STAGING_PREFIX + checkpoint_name(step))


def prepare_staging(run_dir: str, step: int) -> str:
    """A fresh, empty staging root for step ``step`` (a leftover from a killed save is removed)."""
    root = staging_root(run_dir, step)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    return root


def write_manifest(checkpoint: str) -> None:
    """Flush every file of ``checkpoint`` to disk, then record each file and its size, last of all."""
    files = {}
    for path, relative in _files_under(checkpoint):
        _fsync_file(path)
        files[relative] = os.path.getsize(path)
    manifest = os.path.join(checkpoint, MANIFEST_NAME)
    with open(manifest, "w") as f:
        json.dump({"format": 1, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    for directory in _directories_under(checkpoint):
        _fsync_directory(directory)


def publish(run_dir: str, step: int) -> str:
    """Rename the staged ``checkpoint-N`` into place in one step; returns its final path.

    A ``checkpoint-N`` already there (a run resumed from an earlier checkpoint saves step N
    again) is moved aside first and deleted only once the new one is in place.
    """
    root = staging_root(run_dir, step)
    staged = os.path.join(root, checkpoint_name(step))
    final = os.path.join(run_dir, checkpoint_name(step))
    replaced = os.path.join(run_dir, REPLACED_PREFIX + checkpoint_name(step))
    if os.path.lexists(final):
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(staged, final)
    _fsync_directory(run_dir)
    shutil.rmtree(replaced, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    return final


@dataclass(frozen=True)
class StagedCheckpoint:
    root: str  # the staging root (what the Trainer takes as its output directory meanwhile)
    staged: str  # <root>/checkpoint-N: where every rank writes its files
    final: str  # <run_dir>/checkpoint-N: where the checkpoint appears once whole


@contextlib.contextmanager
def staged_checkpoint(
    run_dir: str, step: int, owner: bool, barrier: Callable[[], None] = lambda: None
) -> Iterator[StagedCheckpoint]:
    """Write checkpoint ``step`` of ``run_dir`` inside the block; it appears whole after it, or not at all.

    The one sequence both the Trainer and a hand-written loop use: the owner (the process that
    owns the output directory) prepares the staging root, every process writes its part inside
    the block, then after a barrier the owner flushes the files, writes the manifest and renames,
    and a last barrier keeps every process behind the rename. An exception inside the block
    publishes nothing: the staging leftover is removed by the next run's ``remove_leftovers``.
    """
    if owner:
        prepare_staging(run_dir, step)
    barrier()
    root = staging_root(run_dir, step)
    checkpoint = StagedCheckpoint(
        root, os.path.join(root, checkpoint_name(step)), os.path.join(run_dir, checkpoint_name(step))
    )
    yield checkpoint
    barrier()
    if owner:
        write_manifest(checkpoint.staged)
        publish(run_dir, step)
    barrier()


def remove_leftovers(run_dir: str) -> list[str]:
    """Delete staging (and moved-aside) directories that a killed save left behind; returns them."""
    if not os.path.isdir(run_dir):
        return []
    removed = []
    for entry in sorted(os.listdir(run_dir)):
        if entry.startswith((STAGING_PREFIX + CHECKPOINT_PREFIX, REPLACED_PREFIX + CHECKPOINT_PREFIX)):
            shutil.rmtree(os.path.join(run_dir, entry), ignore_errors=True)
            removed.append(entry)
    return removed


# ---- reading -----------------------------------------------------------------------------
def checkpoint_problems(checkpoint: str) -> list[str]:
    """What keeps ``checkpoint`` from being resumed: [] when it is complete.

    With a manifest (every checkpoint this library writes), each listed file must be there
    with its recorded size. Without one (the plain Trainer's in-place checkpoints), the
    trainer state must parse, weights must be there and every safetensors file must hold
    the bytes its header promises.
    """
    if not os.path.isdir(checkpoint):
        return [f"{checkpoint!r} is not a directory"]
    manifest = os.path.join(checkpoint, MANIFEST_NAME)
    if os.path.isfile(manifest):
        return _manifest_problems(checkpoint, manifest)
    return _unlisted_problems(checkpoint)


def is_weight_file(relative: str) -> bool:
    """Whether a checkpoint file holds model weights (whole, a shard, or a shard index)."""
    name = os.path.basename(relative)
    return name in _WEIGHT_FILES or bool(_WEIGHT_SHARD.match(name))


def require_complete(checkpoint: str, argument: str = "resume_from_checkpoint") -> None:
    """Raise a clear error when ``checkpoint`` does not exist, is no checkpoint, or is incomplete."""
    if not os.path.exists(checkpoint):
        raise IncompleteCheckpointError(
            f"Can't find a valid checkpoint at {checkpoint}: {argument}={checkpoint!r} does not exist."
        )
    if not os.path.isdir(checkpoint):
        raise IncompleteCheckpointError(
            f"Can't find a valid checkpoint at {checkpoint}: {argument}={checkpoint!r} is a file, not a "
            "checkpoint directory (checkpoint-N)."
        )
    if not _looks_like_checkpoint(checkpoint):
        raise IncompleteCheckpointError(
            f"Can't find a valid checkpoint at {checkpoint}: {argument}={checkpoint!r} is not a Trainer "
            f"checkpoint: it holds neither {TRAINER_STATE_NAME}, {MANIFEST_NAME} nor model weights. Name a "
            "checkpoint-N directory inside an output_dir."
        )
    problems = checkpoint_problems(checkpoint)
    if problems:
        raise IncompleteCheckpointError(
            f"Can't find a valid checkpoint at {checkpoint}: {argument}={checkpoint!r} is incomplete (its save was interrupted, or files were lost "
            f"since): {'; '.join(problems)}. Resume from an earlier checkpoint, or pass "
            "resume_from_checkpoint=True to take the newest complete one."
        )


@dataclass
class CheckpointSearch:
    newest: str | None  # the newest complete checkpoint, or None
    skipped: dict[str, list[str]]  # newer directories passed over, with why


def find_newest_complete(run_dir: str) -> CheckpointSearch:
    """The highest-numbered complete ``checkpoint-N`` in ``run_dir``, and the newer ones skipped."""
    skipped: dict[str, list[str]] = {}
    for path in reversed(sorted_checkpoints(run_dir)):
        problems = checkpoint_problems(path)
        if not problems:
            return CheckpointSearch(path, skipped)
        skipped[path] = problems
    return CheckpointSearch(None, skipped)


def last_complete_checkpoint(run_dir: str) -> str | None:
    """The checkpoint a re-run of the same command resumes from (None: start from scratch).

    Like transformers' ``get_last_checkpoint``, but a directory whose save was interrupted is
    skipped with a warning that names it and why.
    """
    if not os.path.isdir(run_dir):
        return None
    search = find_newest_complete(run_dir)
    log_skipped(search)
    return search.newest


def log_skipped(search: CheckpointSearch) -> None:
    for path, problems in search.skipped.items():
        logger.warning("Skipping incomplete checkpoint %s: %s", path, "; ".join(problems))


def sorted_checkpoints(run_dir: str) -> list[str]:
    """Every ``checkpoint-N`` directory of ``run_dir``, oldest step first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for entry in os.listdir(run_dir):
        match = _CHECKPOINT_NAME.match(entry)
        if match and os.path.isdir(os.path.join(run_dir, entry)):
            found.append((int(match.group(1)), os.path.join(run_dir, entry)))
    return [path for _, path in sorted(found)]


def rotate(run_dir: str, save_total_limit: int | None, best: str | None) -> list[str]:
    """Delete the oldest complete checkpoints beyond ``save_total_limit``; returns what was deleted.

    As the Trainer's rotation: the newest and the best checkpoint are always kept. Only complete
    checkpoints count and only they are deleted; an incomplete one is left for the user to see.
    """
    if save_total_limit is None or save_total_limit <= 0:
        return []
    complete = [path for path in sorted_checkpoints(run_dir) if not checkpoint_problems(path)]
    protected = {complete[-1]} if complete else set()
    if best is not None:
        protected.add(os.path.normpath(best))
    keep = max(save_total_limit, len(protected & {os.path.normpath(p) for p in complete}))
    deleted = []
    remaining = len(complete)
    for path in complete:
        if remaining <= keep:
            break
        if os.path.normpath(path) in protected:
            continue
        logger.info("Deleting older checkpoint [%s] due to save_total_limit=%s", path, save_total_limit)
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
        remaining -= 1
    return deleted


# ---- helpers -----------------------------------------------------------------------------
def _files_under(directory: str) -> list[tuple[str, str]]:
    found = []
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            found.append((path, os.path.relpath(path, directory)))
    return sorted(found, key=lambda item: item[1])


def _directories_under(directory: str) -> list[str]:
    return [root for root, _, _ in os.walk(directory)]


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: str) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op where directories cannot be synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _manifest_problems(checkpoint: str, manifest: str) -> list[str]:
    try:
        with open(manifest) as f:
            listed = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{MANIFEST_NAME} is unreadable ({err})"]
    problems, weight_problems = [], []
    for relative, size in sorted(listed.items()):
        path = os.path.join(checkpoint, relative)
        if not os.path.isfile(path):
            problem = f"{relative} is missing"
        elif os.path.getsize(path) != size:
            problem = f"{relative} holds {os.path.getsize(path)} bytes, {size} were written"
        else:
            continue
        (weight_problems if is_weight_file(relative) else problems).append(problem)
    # Weights changed after the save (re-sharded into pieces with an index, converted to another
    # format) were whole when the rename published the checkpoint: judge them by what is there now,
    # which is what the Trainer will load.
    if weight_problems and _weights_problems(checkpoint):
        problems.extend(weight_problems)
    return problems


def _weights_problems(checkpoint: str) -> list[str]:
    """What keeps the weights now in ``checkpoint`` from loading: none there, a shard its index names
    missing, or a safetensors file shorter than its header says. [] when they are whole."""
    names = set(os.listdir(checkpoint))
    if not names & set(_WEIGHT_FILES):
        return ["no model weights (model.safetensors or an index) are there"]
    problems = []
    for index in sorted(names & {n for n in _WEIGHT_FILES if n.endswith(".index.json")}):
        try:
            with open(os.path.join(checkpoint, index)) as f:
                shards = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            problems.append(f"{index} is unreadable ({err})")
            continue
        problems.extend(f"{shard} (named in {index}) is missing" for shard in sorted(shards - names))
    for name in sorted(names):
        if is_weight_file(name) and name.endswith(".safetensors"):
            problem = _safetensors_problem(os.path.join(checkpoint, name))
            if problem:
                problems.append(f"{name} {problem}")
    return problems


def _unlisted_problems(checkpoint: str) -> list[str]:
    problems = []
    state = os.path.join(checkpoint, TRAINER_STATE_NAME)
    if not os.path.isfile(state):
        problems.append(f"{TRAINER_STATE_NAME} is missing")
    else:
        try:
            with open(state) as f:
                json.load(f)
        except ValueError:
            problems.append(f"{TRAINER_STATE_NAME} is truncated (not valid JSON)")
    problems.extend(_weights_problems(checkpoint))
    for path, relative in _files_under(checkpoint):
        checked = not os.path.dirname(relative) and is_weight_file(relative)  # by _weights_problems
        if relative.endswith(".safetensors") and not checked:
            problem = _safetensors_problem(path)
            if problem:
                problems.append(f"{relative} {problem}")
    return problems


def _safetensors_problem(path: str) -> str | None:
    """A safetensors file shorter than its header says (a truncated write), or None."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                return f"is truncated ({size} bytes)"
            header_size = int.from_bytes(prefix, "little")
            if header_size > size - 8:
                return f"is truncated ({size} bytes, the header alone needs {header_size + 8})"
            header = json.loads(f.read(header_size))
    except (OSError, ValueError) as err:
        return f"is unreadable ({err})"
    end = max(
        (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)),
        default=0,
    )
    if 8 + header_size + end > size:
        return f"is truncated ({size} bytes, its tensors need {8 + header_size + end})"
    return None


def _looks_like_checkpoint(directory: str) -> bool:
    names = set(os.listdir(directory))
    return bool(names & {TRAINER_STATE_NAME, MANIFEST_NAME, *_WEIGHT_FILES})
