"""Assertions and helpers shared by the tests."""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

from zsam_hf.checkpoints import load_checkpoint_weights
from zsam_hf.sharding import end_process_group


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor of the model's state dict."""
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def assert_identical(a: dict, b: dict) -> None:
    """The same names, and the same tensors bit for bit."""
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: max difference {(a[name] - b[name]).abs().max()}"


def assert_reloads_whole(source, target, directory, shard: str | None) -> None:
    """``source`` saved (in one file, or in shards of ``shard`` bytes) fills every tensor of ``target``."""
    source.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    assert (directory / "model.safetensors.index.json").exists() == bool(shard)
    assert any(
        not torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values())
    )
    load_checkpoint_weights(target, str(directory))
    assert_identical(weights(source), weights(target))


def random_control_masks(grads: list[torch.Tensor], step: int, seed: int = 0, quantile: float = 0.95) -> list:
    """The random control's masks of one step (one per tensor, None where ndim <= 1), as the engine draws
    them from (seed, step); each holds exactly as many entries as the z-score filter keeps of a tie-free
    tensor, which is asserted against the independent reference."""
    from reference import reference_mask

    from zsam_hf.perturbation import random_kept

    drawn = iter(random_kept([g for g in grads if g.ndim > 1], quantile, seed, step))
    masks = []
    for g in grads:
        if g.ndim <= 1:
            masks.append(None)
            continue
        mask = torch.zeros(g.numel(), dtype=torch.bool)
        mask[next(drawn)[0]] = True
        if g.numel() > 2:  # two entries always tie: the filter keeps none, the control one
            assert mask.sum() == reference_mask(g, quantile).sum()
        masks.append(mask.view(g.shape).numpy())
    return masks


class HostReads(TorchDispatchMode):
    """Counts what would synchronize an accelerator with the host: ``aten._local_scalar_dense`` (``.item()``,
    ``bool()``), ``Tensor.tolist`` (read in C++, outside the dispatcher: counted by patching it) and the
    data-dependent shapes of ``nonzero``; ``seen`` holds the name of every op dispatched."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.reads, self.nonzero = 0, 0
        self.seen: set[str] = set()
        self.inside = False  # entered: it may be entered and left again, counting only inside
        tolist = torch.Tensor.tolist

        def counted(tensor):
            self.reads += self.inside
            return tolist(tensor)

        monkeypatch.setattr(torch.Tensor, "tolist", counted)

    def __enter__(self):
        self.inside = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.inside = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.seen.add(name)
        self.reads += name == "_local_scalar_dense"
        self.nonzero += name in ("nonzero", "masked_select")
        return func(*args, **(kwargs or {}))


def end_distributed_run() -> None:
    """A worker's last step: every rank done, no DDP model left alive, then the library's teardown.

    A DDP model alive after the group is destroyed frees the group's last reference later, under the
    GIL, which can deadlock an exit (``zsam_hf.sharding.end_process_group`` says how): asserted absent
    here, so the rare hang is a plain failure instead.
    """
    gc.collect()
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    assert alive == 0, f"{alive} DDP model(s) outlive the run: train in a function that drops them"
    if dist.is_initialized():
        dist.barrier()
    end_process_group()
