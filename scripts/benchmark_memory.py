#!/usr/bin/env python
"""Peak resident memory of one optimizer step on the CPU, step after step: base optimizer, SAM, ZSAM.

Rows: the base optimizer, our ``ZSAM(variant="sam")`` and ``ZSAM``, pytorch_optimizer's ``SAM`` (the
benchmark extra; left out, with a note, where it does not import), each in the plain first_step/second_step
loop, and the re-created davda54 SAM and released-code ZSAM steps of ``benchmark_step.py``; then the base
optimizer, SAM and ZSAM through ``ZSAMTrainer.training_step``, over the Trainer's own base row
(``sam_variant="none"``).

A CPU has no allocator statistics like CUDA's, and the C allocator keeps freed pages or hands
them back depending on its own history, so a step that allocates fresh buffers can peak at a
different height from one run to the next. This script measures what a user sees: each row
runs in a fresh process (the same model, batch and optimizer loop); before every step the
kernel's resident high-water mark is reset (``/proc/self/clear_refs``), and after it the mark
is read. The report gives each row's peak over the base optimizer's peak, in units of the
parameters' bytes, with its spread over steps and over repeated processes (a steady row has
none), and the resident memory between steps over the base optimizer's (what a row keeps from
step to step: SAM's backups, ZSAM's reused buffers).

    python scripts/benchmark_memory.py                    # a 67M-parameter MLP, 3 processes per row
    python scripts/benchmark_memory.py --width 2048 --depth 4 --repeats 2 --steps 6
    python scripts/benchmark_memory.py --front_doors trainer   # only the rows through ZSAMTrainer
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from functools import partial

# benchmark_step.py, beside this script: the steps each row runs, and the check for pytorch_optimizer the rows
# share (every row, in its own process, imports the same modules)
import benchmark_step as steps_of

ROWS = (
    "base optimizer (SGD)",
    "SAM (ours, ZSAM(variant='sam'))",
    "ZSAM (ours)",
    "SAM (pytorch_optimizer)",
    "SAM (davda54, re-created)",
    "ZSAM (released code, re-created)",
)
# The same steps through ZSAMTrainer.training_step (benchmark_step.trainer_step), over the Trainer's own base row.
TRAINER_ROWS = (
    "base (ZSAMTrainer, sam_variant='none')",
    "SAM (ZSAMTrainer)",
    "ZSAM (ZSAMTrainer)",
)
TRAINER_VARIANTS = dict(zip(TRAINER_ROWS, ("none", "sam", "zsam")))


def _status_kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_row(row: str, width: int, depth: int, batch: int, steps: int, warmup: int) -> dict:
    """Run ``warmup + steps`` optimizer steps of one row in this process; per-step peaks in bytes."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from zsam_hf import ZSAM

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            layers = []
            for _ in range(depth):
                layers += [nn.Linear(width, width), nn.ReLU()]
            self.net = nn.Sequential(*layers[:-1])

        def forward(self, inputs, labels):
            return {"loss": F.cross_entropy(self.net(inputs), labels)}

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MLP()
    data = {"inputs": torch.randn(batch, width), "labels": torch.randint(0, width, (batch,))}
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    params = model.parameters
    # The steps of benchmark_step.py (every row imports the same modules), built only for this row.
    make_step = {
        ROWS[0]: lambda: partial(steps_of.base_step, model, torch.optim.SGD(params(), lr=1e-3), data),
        ROWS[1]: lambda: partial(
            steps_of.two_step, model, ZSAM(params(), torch.optim.SGD, variant="sam", lr=1e-3), data
        ),
        ROWS[2]: lambda: partial(steps_of.two_step, model, ZSAM(params(), torch.optim.SGD, lr=1e-3), data),
        ROWS[3]: lambda: partial(
            steps_of.two_step,
            model,
            steps_of.third_party_sam_class()(params(), torch.optim.SGD, rho=0.05, lr=1e-3),
            data,
        ),
        ROWS[4]: lambda: partial(
            steps_of.davda54_sam_step, model, torch.optim.SGD(params(), lr=1e-3), data, 0.05
        ),
        ROWS[5]: lambda: partial(
            steps_of.released_code_step, model, torch.optim.SGD(params(), lr=1e-3), data, 0.05, 0.95
        ),
    }
    for trainer_row, variant in TRAINER_VARIANTS.items():
        make_step[trainer_row] = partial(_trainer_step_of, model, data, variant)
    step = make_step[row]()

    peaks, resident = [], []
    for i in range(warmup + steps):
        before = _status_kib("VmRSS")
        _reset_high_water_mark()
        step()
        if i >= warmup:
            peaks.append(_status_kib("VmHWM") * 1024)
            resident.append(before * 1024)
    return {"row": row, "param_bytes": param_bytes, "params": param_bytes // 4, "step_peaks": peaks,
            "resident_before": resident}  # fmt: skip


def _trainer_step_of(model, data, variant: str):
    """One optimizer step of ``variant`` through ZSAMTrainer.training_step, as ``benchmark_step.py`` times it."""
    import tempfile
    from types import SimpleNamespace

    trainer = steps_of.make_trainer(
        model, tempfile.mkdtemp(), SimpleNamespace(device="cpu", bf16=False), variant
    )
    return partial(steps_of.trainer_step, trainer, model, data)


def rows_to_measure(front_doors: list[str]) -> list[str]:
    """The rows of the chosen front doors, in the report's order; pytorch_optimizer's left out (with the step
    benchmark's note on stderr) where the package does not import."""
    rows = [
        *(ROWS if "optimizer" in front_doors else ()),
        *(TRAINER_ROWS if "trainer" in front_doors else ()),
    ]
    if ROWS[3] in rows and steps_of.third_party_sam_class() is None:
        rows.remove(ROWS[3])
    return rows


def run_row_in_child(row: str, args) -> dict:
    """``measure_row`` in a fresh interpreter, so no row inherits another's allocator history."""
    command = [sys.executable, __file__, "--child", row, "--width", str(args.width), "--depth", str(args.depth),
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(results: dict[str, list[dict]], args) -> None:
    first = next(iter(results.values()))[0]
    print(f"MLP {args.depth} x Linear({args.width}, {args.width}): {first['params'] / 1e6:.1f}M "
          f"parameters ({first['param_bytes'] / 2**20:.0f} MiB), batch {args.batch}, one thread; {args.repeats} "
          f"processes per row, {args.steps} steps each after {args.warmup} warm-up steps")  # fmt: skip
    for rows in (ROWS, TRAINER_ROWS):
        if rows[0] in results:
            _report_rows({row: results[row] for row in rows if row in results}, rows[0])


def _report_rows(results: dict[str, list[dict]], base_row: str) -> None:
    """Each row's peak over ``base_row``'s, in parameter bytes."""
    param_bytes = results[base_row][0]["param_bytes"]
    base = statistics.median(p for r in results[base_row] for p in r["step_peaks"])
    base_resident = statistics.median(p for r in results[base_row] for p in r["resident_before"])
    print(f"\nfigures over the {base_row} row's, in parameter bytes; spreads are max - min")
    print(f"{'row':<40}{'peak':>8}{'spread over steps':>19}{'over processes':>16}{'kept between steps':>20}")
    for row, runs in results.items():
        over = [(p - base) / param_bytes for r in runs for p in r["step_peaks"]]
        per_process = [statistics.median((p - base) / param_bytes for p in r["step_peaks"]) for r in runs]
        within = max(max(r["step_peaks"]) - min(r["step_peaks"]) for r in runs) / param_bytes
        kept = statistics.median(
            (p - base_resident) / param_bytes for r in runs for p in r["resident_before"]
        )
        print(f"{row:<40}{statistics.median(over):>8.3f}{within:>19.3f}"
              f"{max(per_process) - min(per_process):>16.3f}{kept:>20.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=4, help="Linear(width, width) layers")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="measured steps per process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per row")
    parser.add_argument("--json", help="also write the per-step figures here")
    parser.add_argument(
        "--front_doors", nargs="+", choices=("optimizer", "trainer"), default=["optimizer", "trainer"],
        help="rows through the optimizer (first_step/second_step), through ZSAMTrainer, or both",
    )  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(
            json.dumps(measure_row(args.child, args.width, args.depth, args.batch, args.steps, args.warmup))
        )
        return
    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("this benchmark reads Linux's /proc/self/status and resets /proc/self/clear_refs")
    results = {
        row: [run_row_in_child(row, args) for _ in range(args.repeats)]
        for row in rows_to_measure(args.front_doors)
    }
    report(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, **vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
