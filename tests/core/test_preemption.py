"""A job killed at any instant, even while it writes a checkpoint, resumes exactly when run again.

Fault injection through the real Trainer: a training subprocess (``preemption_worker.py``,
a checkpoint every 3 steps) is SIGKILLed at random instants or right after a staging
directory appears (mid-save), then the very same command runs again, as a preempted job's
scheduler would run it, with no user action in between. After every kill each visible
``checkpoint-N`` must be complete and the next run must resume from the newest of them; the
run that finally finishes must end at exactly the weights of an uninterrupted run (and so must
every checkpoint on the way).
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from checks import assert_identical
from toy import make_args, vector_dataset

from zsam_hf import IncompleteCheckpointError, ZSAMTrainer
from zsam_hf.checkpoint_dirs import MANIFEST_NAME, STAGING_PREFIX, checkpoint_problems, sorted_checkpoints

HELPERS = Path(__file__).resolve().parent.parent / "helpers"
WORKER = HELPERS / "preemption_worker.py"
SAVE_STEPS, MAX_STEPS = 3, 30  # as in the worker


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(HELPERS) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }


class Job:
    """One launch of the worker command, its stdout read line by line in the background."""

    def __init__(self, out: Path, variant: str, processes: int = 1, hold_before_final_save: bool = False):
        if processes == 1:
            cmd = [sys.executable, str(WORKER), str(out), variant]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   str(WORKER), str(out), variant]  # fmt: skip
        env = {**_env(), "HOLD_BEFORE_FINAL_SAVE": "1" if hold_before_final_save else "0"}
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float = 240) -> str | None:
        """The first line starting with ``prefix``, or None once the process has ended without it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                break
            if line is None:
                return None
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(
            f"no {prefix!r} line within {timeout} s; output so far:\n" + "\n".join(self.seen)
        )

    def pids(self, processes: int) -> dict[int, int]:
        found = {}
        while len(found) < processes:
            _, rank, pid = self.wait_for("PID").split()
            found[int(rank)] = int(pid)
        return found

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        while self.wait_for("", timeout=30) is not None:
            pass
        return code

    def output(self) -> str:
        return "\n".join(self.seen)


def _newest_checkpoint(out: Path) -> str:
    found = sorted_checkpoints(str(out))
    return found[-1] if found else "none"


def _staging_dirs(out: Path) -> list[str]:
    return [e for e in os.listdir(out) if e.startswith(STAGING_PREFIX)] if out.is_dir() else []


def _wait_for_staging(job: Job, out: Path, step: int, timeout: float = 120) -> bool:
    """Poll (every 0.2 ms) until the staging directory of ``step`` appears; False if the job ends first."""
    target = f"{STAGING_PREFIX}checkpoint-{step}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.is_dir() and target in os.listdir(out):
            return True
        if job.proc.poll() is not None:
            return False
        time.sleep(0.0002)
    raise AssertionError(f"{target} never appeared")


@dataclass
class ChainReport:
    kills: int = 0
    mid_save: int = 0  # kills after which a staging directory was left: the save was under way
    resumed_from: list[str] | None = None


def _steps_done(checkpoint: str) -> int:
    return 0 if checkpoint == "none" else int(checkpoint.rsplit("-", 1)[1])


def _kill_chain(
    out: Path, variant: str, policy: str, kills: int, seed: int, span: float, processes: int = 1
) -> ChainReport:
    """Launch, kill (SIGKILL) per ``policy``, launch the same command again ... ``kills`` times, then
    let the last launch finish. ``span``: an uninterrupted run's training time, for random kills."""
    rng = random.Random(seed)
    report = ChainReport(resumed_from=[])
    attempts = 0
    # mid-save: until `kills` of them landed while a save was under way (a few may land just after)
    while (report.mid_save if policy == "mid-save" else report.kills) < kills:
        attempts += 1
        assert attempts <= 3 * kills, f"only {report.mid_save} of {report.kills} kills landed mid-save"
        expected = _newest_checkpoint(out)
        job = Job(out, variant, processes)
        pids = job.pids(processes)
        resumed = job.wait_for("RESUME")
        assert resumed == f"RESUME {expected}", job.output()  # the newest complete checkpoint
        report.resumed_from.append(Path(expected).name)
        assert job.wait_for("TRAIN_BEGIN") is not None, job.output()
        done = _steps_done(expected)
        victim = pids[rng.randrange(processes)]
        if policy == "mid-save":
            step = min(done + SAVE_STEPS * rng.randint(1, 3), MAX_STEPS)  # one of the next saves
            if not _wait_for_staging(job, out, step):
                raise AssertionError("the job ended before its save:\n" + job.output())
            time.sleep(rng.uniform(0, 0.01))
        else:
            time.sleep(rng.uniform(0, span * (MAX_STEPS - done) / MAX_STEPS))
        if job.proc.poll() is None:
            os.kill(victim, signal.SIGKILL)
        code = job.finish()
        if code == 0:  # a random instant after the run had ended: no kill, the chain is over
            break
        assert code != 0, job.output()
        report.kills += 1
        report.mid_save += bool(_staging_dirs(out))
        for checkpoint in sorted_checkpoints(str(out)):  # whatever is visible is whole
            assert checkpoint_problems(checkpoint) == [], checkpoint
    expected = _newest_checkpoint(out)
    job = Job(out, variant, processes)
    assert job.wait_for("RESUME") == f"RESUME {expected}", job.output()
    assert job.finish() == 0, job.output()
    assert "DONE" in job.output(), job.output()
    assert not _staging_dirs(out)  # the leftovers of killed saves were removed
    return report


def _straight_run(out: Path, variant: str, processes: int = 1) -> float:
    job = Job(out, variant, processes)
    assert job.wait_for("TRAIN_BEGIN") is not None, job.output()
    start = time.monotonic()
    assert job.wait_for("DONE") is not None, job.output()
    span = time.monotonic() - start
    assert job.finish() == 0, job.output()
    return span


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(path / "model.safetensors")


def _assert_same_run(killed: Path, straight: Path) -> None:
    """The final weights, and those of every checkpoint on the way, equal the uninterrupted run's."""
    assert_identical(_weights(killed / "final"), _weights(straight / "final"))
    checkpoints = [Path(p).name for p in sorted_checkpoints(str(killed))]
    assert checkpoints == [f"checkpoint-{s}" for s in range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS)]
    for name in checkpoints:
        assert_identical(_weights(killed / name), _weights(straight / name))


@pytest.mark.fault_injection
def test_sigkill_at_any_instant_resumes_bit_identically(tmp_path):
    variants = ("zsam", "fsam")  # fsam: its gradient average travels in the checkpoint too
    with ThreadPoolExecutor(2) as pool:
        spans = dict(
            zip(variants, pool.map(lambda v: _straight_run(tmp_path / f"straight-{v}", v), variants))
        )
        plans = [  # (variant, policy, kills, seed)
            ("zsam", "mid-save", 6, 1),
            ("fsam", "mid-save", 6, 2),
            ("zsam", "random", 5, 3),
            ("fsam", "random", 5, 4),
        ]
        reports = list(
            pool.map(
                lambda plan: _kill_chain(
                    tmp_path / f"killed-{plan[1]}-{plan[0]}",
                    plan[0],
                    plan[1],
                    plan[2],
                    plan[3],
                    spans[plan[0]],
                ),
                plans,
            )
        )
    for variant, policy, _, _ in plans:
        _assert_same_run(tmp_path / f"killed-{policy}-{variant}", tmp_path / f"straight-{variant}")
    kills = sum(r.kills for r in reports)
    mid_save = sum(r.mid_save for r in reports)
    print(f"\n{kills} kills, {mid_save} of them mid-save; resumed from: {[r.resumed_from for r in reports]}")
    assert kills >= 20 and mid_save >= 10, (kills, mid_save)


@pytest.mark.fault_injection
def test_a_kill_after_the_last_checkpoint_before_the_final_save_resumes_without_a_step(tmp_path):
    """The instant a random kill finds only by chance, made on purpose: checkpoint-<max_steps> is in
    place and the final save has not happened. The same command run again takes no step, writes no
    checkpoint-<max_steps + 1>, and saves the uninterrupted run's final weights."""
    _straight_run(tmp_path / "straight", "zsam")
    killed = tmp_path / "killed"
    job = Job(killed, "zsam", hold_before_final_save=True)
    (pid,) = job.pids(1).values()
    assert job.wait_for("TRAINED") is not None, job.output()
    assert _newest_checkpoint(killed) == str(killed / f"checkpoint-{MAX_STEPS}")
    os.kill(pid, signal.SIGKILL)
    assert job.finish() != 0
    assert not (killed / "final").exists()
    rerun = Job(killed, "zsam")
    assert rerun.wait_for("RESUME") == f"RESUME {killed / f'checkpoint-{MAX_STEPS}'}", rerun.output()
    assert rerun.finish() == 0, rerun.output()
    assert "DONE" in rerun.output()
    _assert_same_run(killed, tmp_path / "straight")  # checkpoints up to max_steps and no further


@pytest.mark.fault_injection
def test_ddp_rank_killed_mid_save_resumes_bit_identically(tmp_path):
    """2 gloo processes under torchrun; one rank SIGKILLed mid-save takes the job down (torchrun ends
    the other), and the same torchrun command resumes to the uninterrupted DDP run's weights."""
    _straight_run(tmp_path / "straight", "zsam", processes=2)
    report = _kill_chain(tmp_path / "killed", "zsam", "mid-save", 3, seed=5, span=0, processes=2)
    assert report.kills == 3 and report.mid_save >= 2, report
    _assert_same_run(tmp_path / "killed", tmp_path / "straight")


# ---- an explicitly named checkpoint that cannot be resumed is refused before training -------------
@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("saved")
    args = make_args(tmp, max_steps=2, save_strategy="steps", save_steps=2, optim="adamw_torch")
    ZSAMTrainer(model=_mlp(), args=args, train_dataset=vector_dataset(16)).train()
    return tmp / "out" / "checkpoint-2"


def _mlp():
    from toy import TinyClassifier

    return TinyClassifier()


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "out" / checkpoint.name
    shutil.copytree(checkpoint, target)
    return target


def _train_from(tmp_path: Path, resume) -> ZSAMTrainer:
    trainer = ZSAMTrainer(
        model=_mlp(),
        args=make_args(tmp_path, max_steps=4, optim="adamw_torch"),
        train_dataset=vector_dataset(16),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("damage", ["missing", "truncated"])
@pytest.mark.parametrize(
    "victim", ["model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state.pth"]
)
def test_a_named_damaged_checkpoint_is_refused_naming_the_file(tmp_path, saved_checkpoint, damage, victim):
    checkpoint = _copy(saved_checkpoint, tmp_path)
    path = checkpoint / victim
    if damage == "missing":
        path.unlink()
    else:
        os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(IncompleteCheckpointError, match=rf"{victim} (is missing|holds \d+ bytes)") as err:
        _train_from(tmp_path, str(checkpoint))
    assert "resume_from_checkpoint=" in str(err.value)


def test_a_truncated_checkpoint_without_a_manifest_is_refused(tmp_path, saved_checkpoint):
    """The plain Trainer's checkpoints carry no manifest: the safetensors header tells the truncation."""
    checkpoint = _copy(saved_checkpoint, tmp_path)
    (checkpoint / MANIFEST_NAME).unlink()
    assert checkpoint_problems(str(checkpoint)) == []
    weights = checkpoint / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 4)
    with pytest.raises(IncompleteCheckpointError, match=r"model\.safetensors is truncated"):
        _train_from(tmp_path, str(checkpoint))


@pytest.mark.parametrize("kind", ["missing", "file", "not-a-checkpoint"])
def test_a_resume_path_that_is_no_checkpoint_fails_before_training(tmp_path, kind):
    target = tmp_path / "elsewhere"
    if kind == "file":
        target.write_text("x")
    elif kind == "not-a-checkpoint":
        target.mkdir()
        (target / "notes.txt").write_text("x")
    expected = {
        "missing": "does not exist",
        "file": "is a file",
        "not-a-checkpoint": "is not a Trainer checkpoint",
    }
    trainer = ZSAMTrainer(
        model=_mlp(), args=make_args(tmp_path, max_steps=4), train_dataset=vector_dataset(16)
    )
    with pytest.raises(IncompleteCheckpointError, match=expected[kind]):
        trainer.train(resume_from_checkpoint=str(target))
    assert trainer.state.global_step == 0


def test_resume_true_skips_an_incomplete_newer_checkpoint_and_removes_staging(
    tmp_path, saved_checkpoint, caplog
):
    good = _copy(saved_checkpoint, tmp_path)
    broken = good.parent / "checkpoint-3"  # a newer checkpoint whose save was cut short
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\x00" * 8)
    staging = good.parent / f"{STAGING_PREFIX}checkpoint-4" / "checkpoint-4"
    staging.mkdir(parents=True)
    trainer = _train_from(tmp_path, True)
    assert trainer.state.global_step == 4
    assert "Skipping incomplete checkpoint" in caplog.text and "checkpoint-3" in caplog.text
    assert not staging.parent.exists()
    assert broken.exists()  # left for the user to look at, never resumed from nor rotated


def test_resume_true_without_a_complete_checkpoint_says_so(tmp_path):
    broken = tmp_path / "out" / "checkpoint-2"
    broken.mkdir(parents=True)
    trainer = ZSAMTrainer(
        model=_mlp(), args=make_args(tmp_path, max_steps=4), train_dataset=vector_dataset(16)
    )
    with pytest.raises(
        IncompleteCheckpointError, match=r"no complete checkpoint \(incomplete: .*checkpoint-2"
    ):
        trainer.train(resume_from_checkpoint=True)


def test_rotation_keeps_the_best_and_never_counts_an_incomplete_checkpoint(tmp_path):
    """save_total_limit=2 with load_best_model_at_end: the best checkpoint survives rotation, every
    trainer_state.json names final (never staging) paths, and an incomplete directory is left alone."""
    import json

    stray = tmp_path / "out" / "checkpoint-100"  # an interrupted save from some other run
    stray.mkdir(parents=True)
    args = make_args(
        tmp_path, max_steps=8, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
        save_total_limit=2, load_best_model_at_end=True, metric_for_best_model="loss", optim="sgd",
        learning_rate=0.8,
    )  # fmt: skip
    trainer = ZSAMTrainer(
        model=_mlp(), args=args, train_dataset=vector_dataset(32), eval_dataset=vector_dataset(16, seed=5)
    )
    trainer.train()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    best_step = 1 + evals.index(min(evals))
    assert best_step != 8  # the best is not the last, so rotation must protect it
    kept = {Path(p).name for p in sorted_checkpoints(str(tmp_path / "out"))}
    assert kept == {f"checkpoint-{best_step}", "checkpoint-8", "checkpoint-100"}
    assert Path(trainer.state.best_model_checkpoint).name == f"checkpoint-{best_step}"
    for name in kept - {"checkpoint-100"}:
        state = json.loads((tmp_path / "out" / name / "trainer_state.json").read_text())
        assert STAGING_PREFIX not in (state["best_model_checkpoint"] or "")
        assert checkpoint_problems(str(tmp_path / "out" / name)) == []
    assert trainer.evaluate()["eval_loss"] == pytest.approx(min(evals), rel=1e-6, abs=1e-7)


def test_markers_of_ranks_sharing_one_pipe_each_arrive_on_a_line_of_their_own():
    """The instant that once failed this file: two ranks printing their PID lines at the same moment
    into the test's one pipe (``print`` writes text and newline apart). Two processes here share a pipe
    and announce 300 markers each between half-written lines of other output; every marker arrives whole."""
    script = (
        "import sys\n"
        "from markers import announce\n"
        "for i in range(300):\n"
        "    print('warning fragment ', end='', flush=True)\n"
        "    announce(f'PID {sys.argv[1]} {i}')\n"
    )
    read_end, write_end = os.pipe()
    procs = [
        subprocess.Popen([sys.executable, "-u", "-c", script, str(rank)], env=_env(), stdout=write_end)
        for rank in (0, 1)
    ]
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        lines = pipe.read().splitlines()
    assert all(proc.wait(timeout=60) == 0 for proc in procs)
    markers = [line.split() for line in lines if line.startswith("PID")]
    assert sorted((int(r), int(i)) for _, r, i in markers) == [(r, i) for r in (0, 1) for i in range(300)]
