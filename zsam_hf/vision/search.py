"""The training script's search mode: choose rho (and optionally the learning rate) on the validation split.

``trainer.hyperparameter_search`` with ``model_init`` (each trial starts from the same seeded
initial weights), Optuna in this process or Ray Tune across processes or machines. Every trial is
written down as it ends (hyperparameters, validation metrics, mean ||e||, wall time) in
``OUTPUT_DIR/trials/``; the search then writes ``hp_search.csv``, ``hp_search.md`` and
``hp_search.png`` (validation accuracy against rho, log axis), and prints the best trial with the
exact command that trains it. With Optuna the study lives in ``OUTPUT_DIR/hp_search.db``: the same
command run again after an interruption runs only the trials still missing.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from .. import run_lock
from ..card import redact_command
from ..config import ZSAMTrainingArguments
from ..trainer import ZSAMTrainer
from .image_classification import (
    AugmentationEpoch,
    DataArguments,
    ModelArguments,
    SetupError,
    build_model_from_arguments,
    prepare_data,
)
from .metrics import classification_metrics

logger = logging.getLogger(__name__)

BACKENDS = ("optuna", "ray")
STUDY_NAME = "zsam-hp-search"
OBJECTIVE = "eval_accuracy"


@dataclass
class SearchArguments:
    """Search rho (and the learning rate) instead of training once."""

    hp_search_trials: int = field(
        default=0,
        metadata={"help": "Run a hyperparameter search of this many trials (0: train once, no search)."},
    )
    hp_search_backend: str = field(
        default="optuna",
        metadata={"help": "optuna (trials one after another in this process; resumable) or ray (Ray Tune)."},
    )
    hp_search_rho: str = field(
        default="0.01:0.5",
        metadata={"help": "sam_rho to search: 'LO:HI' (log-uniform) or a list 'A,B,C' (each value once)."},
    )
    hp_search_learning_rate: str | None = field(
        default=None,
        metadata={"help": "Also search the learning rate: 'LO:HI' (log-uniform) or 'A,B,C'. Unset: fixed."},
    )
    hp_search_ray_address: str | None = field(
        default=None,
        metadata={"help": "Ray cluster to join ('auto' for the one `ray start` made); unset: a local one."},
    )

    def __post_init__(self):
        if not isinstance(self.hp_search_trials, int) or self.hp_search_trials < 0:
            raise ValueError(
                f"hp_search_trials={self.hp_search_trials!r} is invalid: expected a whole number >= 0 "
                "(0 trains once)"
            )
        if self.hp_search_backend not in BACKENDS:
            raise ValueError(
                f"hp_search_backend={self.hp_search_backend!r} is invalid: expected one of {', '.join(BACKENDS)}"
            )
        parse_space("hp_search_rho", self.hp_search_rho)
        if self.hp_search_learning_rate is not None:
            parse_space("hp_search_learning_rate", self.hp_search_learning_rate)

    def spaces(self) -> dict[str, tuple]:
        """Each searched field and its space: ('range', lo, hi) or ('list', values)."""
        spaces = {"sam_rho": parse_space("hp_search_rho", self.hp_search_rho)}
        if self.hp_search_learning_rate is not None:
            spaces["learning_rate"] = parse_space("hp_search_learning_rate", self.hp_search_learning_rate)
        return spaces


def parse_space(name: str, text: str) -> tuple:
    """'LO:HI' -> ('range', LO, HI), a log-uniform range; 'A,B,C' -> ('list', (A, B, C))."""
    allowed = "expected 'LO:HI' (0 < LO < HI, searched log-uniformly) or a list of positive values 'A,B,C'"
    try:
        if ":" in text:
            lo, hi = (float(part) for part in text.split(":"))
            if 0 < lo < hi and math.isfinite(hi):
                return ("range", lo, hi)
        else:
            values = tuple(float(part) for part in text.split(","))
            if values and all(v > 0 and math.isfinite(v) for v in values):
                return ("list", values)
    except ValueError:
        pass
    raise ValueError(f"{name}={text!r} is invalid: {allowed}")


# ---- each trial, written down in the process that runs it ------------------------------------------
class TrialLog(TrainerCallback):
    """Writes one JSON file per trial when it ends: hyperparameters, last validation metrics, the
    mean logged ||e||, wall time. Runs in whatever process trains the trial (Ray's workers too)."""

    def __init__(self, trials_dir: str, searched: tuple[str, ...]):
        self.trials_dir = trials_dir
        self.searched = searched
        self._reset()

    def _reset(self) -> None:
        self.norms: list[float] = []
        self.metrics: dict[str, float] = {}
        self.started = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        self._reset()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "perturbation_norm" in logs:
            self.norms.append(float(logs["perturbation_norm"]))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.metrics = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float))}

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        record = {
            **{name: getattr(args, name) for name in self.searched},
            "sam_variant": args.sam_variant,
            **{k: v for k, v in self.metrics.items() if k.startswith("eval_")},
            "perturbation_norm": sum(self.norms) / len(self.norms) if self.norms else None,
            "wall_time_s": round(time.time() - self.started, 1),
            "steps": state.global_step,
            "finished_at": time.time(),
        }
        os.makedirs(self.trials_dir, exist_ok=True)
        name = state.trial_name or f"trial-{uuid.uuid4().hex[:12]}"
        path = os.path.join(self.trials_dir, f"{name}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(path + ".tmp", path)  # a trial's record appears whole or not at all


# ---- the search ----------------------------------------------------------------------------------
@dataclass
class SearchResult:
    rows: list[dict]
    best: dict
    command: str
    output_dir: Path


def run_search(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: ZSAMTrainingArguments,
    search_args: SearchArguments,
    argv: list[str],
) -> SearchResult:
    """Search the configured space on the validation split; write the table and plot; return the best."""
    if data_args.eval_split == "test":
        raise SetupError(
            "eval_split='test' is invalid in a hyperparameter search: trials are scored on the split evaluated "
            "during training, and choosing on the test split would make its accuracy meaningless. Use 'auto' "
            "(validation carved from train when the dataset has none) or a validation split's name."
        )
    if training_args.eval_strategy == "no":
        raise SetupError(
            "eval_strategy='no' is invalid in a hyperparameter search: each trial is scored on its last "
            "evaluation of the validation split. Use --eval_strategy epoch (the script's default) or steps."
        )
    output_dir = Path(training_args.output_dir)
    spaces = search_args.spaces()
    data = prepare_data(model_args, data_args, training_args.seed)
    if data.eval_name == "test":
        raise SetupError(
            "The dataset's evaluation split is its test split; a search must not choose on it. Pass "
            "--eval_split auto to carve a validation split from train."
        )
    trainer = ZSAMTrainer(
        model_init=_model_init(model_args, data),
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=data.built.image_processor,
        compute_metrics=classification_metrics(),
        callbacks=[AugmentationEpoch(data.augmentation), TrialLog(str(output_dir / "trials"), tuple(spaces))],
    )
    with _search_lock(output_dir):
        if search_args.hp_search_backend == "optuna":
            finished = _search_with_optuna(
                trainer, spaces, search_args.hp_search_trials, output_dir, training_args.seed
            )
        else:
            _search_with_ray(trainer, spaces, search_args, output_dir)
            finished = None
    rows = read_trials(output_dir / "trials", finished)
    if not rows:
        raise RuntimeError(f"The search finished no trial (see the log); {output_dir / 'trials'} is empty.")
    best = max(rows, key=lambda row: row.get(OBJECTIVE, -math.inf))
    command = best_command(argv, best, tuple(spaces))
    write_report(rows, best, command, output_dir, tuple(spaces))
    return SearchResult(rows, best, command, output_dir)


def _model_init(model_args: ModelArguments, data):
    """A fresh model per trial; the Trainer seeds before calling it, so every trial starts alike."""
    labels, preprocessing = data.labels, data.built.preprocessing

    def model_init():
        return build_model_from_arguments(model_args, labels, preprocessing).model

    return model_init


def _search_with_optuna(trainer, spaces: dict, n_trials: int, output_dir: Path, seed: int) -> set[str]:
    """Run the trials still missing from the study in ``output_dir/hp_search.db``; returns the names
    (``trial-N``) of every finished trial of the study, the ones run before included."""
    import optuna

    output_dir.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{output_dir / 'hp_search.db'}"
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed),
    )
    _close_interrupted(study)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    lists_only = all(space[0] == "list" for space in spaces.values())
    if lists_only:  # every combination once: the ones not done yet are queued
        combinations = [
            dict(zip(spaces, values)) for values in itertools.product(*(s[1] for s in spaces.values()))
        ]
        n_trials = min(n_trials, len(combinations))
        finished = [t.params for t in done]
        waiting = [t.params for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
        for params in [c for c in combinations if c not in finished][: max(n_trials - len(done), 0)]:
            if params not in waiting:
                study.enqueue_trial(params)
    remaining = n_trials - len(done)
    if done:
        logger.warning(
            "Resuming the search in %s: %d of %d trials already finished.", storage, len(done), n_trials
        )
    if remaining > 0:

        def hp_space(trial):
            params = {}
            for name, space in spaces.items():
                if space[0] == "range":
                    params[name] = trial.suggest_float(name, space[1], space[2], log=True)
                else:
                    params[name] = trial.suggest_categorical(name, list(space[1]))
            return params

        trainer.hyperparameter_search(
            hp_space=hp_space,
            backend="optuna",
            n_trials=remaining,
            direction="maximize",
            compute_objective=lambda metrics: metrics[OBJECTIVE],
            hp_name=_trial_name,
            study_name=STUDY_NAME,
            storage=storage,
            load_if_exists=True,
            sampler=study.sampler,
        )
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    return {_trial_name(t) for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}


def _trial_name(trial) -> str:
    """An Optuna trial's name: its run directory and its record (``trials/trial-N.json``)."""
    return f"trial-{trial.number}"


def _close_interrupted(study) -> None:
    """Mark trials left RUNNING by a killed search as failed (this search owns the study now)."""
    import optuna

    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.RUNNING:
            logger.warning("Trial %d was interrupted: it is marked failed and not counted.", trial.number)
            study._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)


def _search_with_ray(trainer, spaces: dict, search_args: SearchArguments, output_dir: Path) -> None:
    import ray
    from ray import tune

    def hp_space(_):
        return {
            name: tune.loguniform(space[1], space[2]) if space[0] == "range" else tune.choice(list(space[1]))
            for name, space in spaces.items()
        }

    if not ray.is_initialized():
        ray.init(address=search_args.hp_search_ray_address, include_dashboard=False)
    trainer.hyperparameter_search(
        hp_space=hp_space,
        backend="ray",
        n_trials=search_args.hp_search_trials,
        direction="maximize",
        compute_objective=lambda metrics: metrics[OBJECTIVE],
        resources_per_trial={"cpu": 1},
        storage_path=str((output_dir / "ray_results").resolve()),
        name=STUDY_NAME,
    )


# ---- the report ----------------------------------------------------------------------------------
def read_trials(trials_dir: Path, finished: set[str] | None = None) -> list[dict]:
    """Every finished trial's record (only those named in ``finished``, when given), in the order
    they finished."""
    if not trials_dir.is_dir():
        return []
    paths = [p for p in trials_dir.glob("trial-*.json") if finished is None or p.stem in finished]
    return sorted((json.loads(p.read_text()) for p in paths), key=lambda row: row["finished_at"])


@contextlib.contextmanager
def _search_lock(output_dir: Path):
    """One search at a time per output directory (each trial's own run directory is locked too)."""
    lock = run_lock.acquire(str(output_dir))
    try:
        yield
    finally:
        lock.release()


def best_command(argv: list[str], best: dict, searched: tuple[str, ...]) -> str:
    """The command that trains the best trial: the search's own, without the search flags and with
    the chosen values (and its own output directory)."""
    kept, skip = [], False
    drop = {f"--{name}" for name in (*searched, "output_dir")}
    for token in argv[1:]:
        if skip:
            skip = False
            continue
        flag = token.split("=", 1)[0]
        if flag.startswith("--hp_search_") or flag in drop:
            skip = "=" not in token
            continue
        kept.append(token)
    output_dir = next((argv[i + 1] for i, t in enumerate(argv[:-1]) if t == "--output_dir"), "outputs/search")
    chosen = [f"--{name} {best[name]:.4g}" for name in searched]
    return redact_command(
        ["python", argv[0], *kept, *" ".join(chosen).split(), "--output_dir", f"{output_dir}/best"]
    )


def write_report(
    rows: list[dict], best: dict, command: str, output_dir: Path, searched: tuple[str, ...]
) -> None:
    columns = [*searched, "eval_accuracy", "eval_loss", "perturbation_norm", "wall_time_s", "steps"]
    with open(output_dir / "hp_search.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| " + " | ".join(columns) + " | |",
        "|" + "---|" * (len(columns) + 1),
        *(
            "| "
            + " | ".join(_cell(row.get(c)) for c in columns)
            + (" | **best** |" if row is best else " | |")
            for row in sorted(rows, key=lambda row: row["sam_rho"])
        ),
        "",
        f"Best (validation accuracy {best.get(OBJECTIVE, float('nan')):.4f}): `{command}`",
    ]
    (output_dir / "hp_search.md").write_text("\n".join(lines) + "\n")
    _plot(rows, best, output_dir / "hp_search.png")


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plot(rows: list[dict], best: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ordered = sorted(rows, key=lambda row: row["sam_rho"])
    ax.plot([r["sam_rho"] for r in ordered], [r.get(OBJECTIVE) for r in ordered], "o-", color="tab:blue")
    ax.plot([best["sam_rho"]], [best.get(OBJECTIVE)], "*", markersize=14, color="tab:red", label="best")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only: minor labels collide
    ax.set_xlabel("sam_rho (log scale)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"{len(rows)} trials ({best.get('sam_variant')})")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["SearchArguments", "SearchResult", "TrialLog", "parse_space", "run_search"]
