"""The two controls that isolate what ZSAM's filter does: random masks at ZSAM's density
(``sam_variant="random"``), and SAM with the released code's per-tensor split (``sam`` + ``tensor``).

The e they build is checked against tests/helpers/reference.py in test_optimizer.py; here: the masks'
counts, their draws (fresh each step, repeatable from (seed, step), the global RNG untouched), and the
controls through the Trainer (logs, card, exact resume, FSDP2 refused).
"""

from __future__ import annotations

import math

import pytest
import torch
from checks import assert_identical
from reference import reference_mask
from toy import TinyClassifier, make_args, vector_dataset
from transformers import TrainerCallback

from zsam_hf import ZSAMTrainer
from zsam_hf.mixin import _check_backend
from zsam_hf.perturbation import SharpnessPerturbation, SparseOffset, random_kept_count


def _grads(seed: int = 0) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37, 11), (5, 3, 3, 3), (1, 1), (2, 1), (64,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    return [f"p{i}.weight" for i in range(len(shapes))], params, grads


def _masks(engine: SharpnessPerturbation, step: int) -> list[torch.Tensor | None]:
    names, params, grads = _grads()
    offsets, _ = engine.offsets(names, params, [g.clone() for g in grads], step=step)
    masks = []
    for p, offset in zip(params, offsets):
        if isinstance(offset, SparseOffset):
            mask = torch.zeros(p.numel(), dtype=torch.bool)
            mask[offset.indices] = True
            masks.append(mask)
        else:
            masks.append(None)  # dense: SAM's fallback (nothing kept) or a tensor with ndim <= 1
    return masks


@pytest.mark.parametrize("quantile", [0.95, 0.5, 0.99, 0.0])
def test_random_masks_keep_as_many_entries_as_the_zscore_filter(quantile):
    engine = SharpnessPerturbation(variant="random", quantile=quantile)
    _, _, grads = _grads()
    for g, mask in zip(grads, _masks(engine, step=3)):
        if g.ndim <= 1:
            assert mask is None
            continue
        n = g.numel()
        expected = n - 1 - math.floor(quantile * (n - 1))  # the SPEC's k
        assert random_kept_count(n, quantile) == expected
        if n > 2:  # two entries always tie (|g - mean| is the same for both), so the filter keeps none
            assert int(reference_mask(g, quantile).sum()) == expected  # what the z-score filter keeps
        if expected == 0:  # a one-entry tensor keeps nothing: SAM's e_p, as for zsam
            assert mask is None
        else:
            assert int(mask.sum()) == expected


def test_random_masks_are_fresh_each_step_and_repeat_from_seed_and_step():
    engine = SharpnessPerturbation(variant="random", seed=7)
    before = torch.random.get_rng_state()
    step3, again, step4 = _masks(engine, 3), _masks(engine, 3), _masks(engine, 4)
    other_seed = _masks(SharpnessPerturbation(variant="random", seed=8), 3)
    assert torch.equal(torch.random.get_rng_state(), before)  # dropout and data order untouched
    big = 0  # the 37 x 11 tensor: 19 of 407 entries
    assert torch.equal(step3[big], again[big])
    assert not torch.equal(step3[big], step4[big])
    assert not torch.equal(step3[big], other_seed[big])


def test_random_masks_cover_the_tensor_uniformly():
    """Over many steps each entry is kept about k / n of the time (a chi-square bound, fixed draws)."""
    engine = SharpnessPerturbation(variant="random", seed=0)
    counts = torch.zeros(37 * 11)
    steps = 400
    for step in range(steps):
        counts += _masks(engine, step)[0].float()
    expected = steps * random_kept_count(37 * 11, 0.95) / (37 * 11)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 407 + 6 * math.sqrt(2 * 407)  # mean 406 degrees of freedom, 6 standard deviations


class _Logs(TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def _train(tmp_path, **overrides) -> tuple[ZSAMTrainer, _Logs]:
    args = make_args(tmp_path, **{"max_steps": 4, "optim": "adamw_torch", **overrides})
    trainer = ZSAMTrainer(model=TinyClassifier(hidden=40), args=args, train_dataset=vector_dataset(32))
    logs = _Logs()
    trainer.add_callback(logs)
    return trainer, logs


def test_the_random_control_through_the_trainer_logs_and_card(tmp_path):
    trainer, logs = _train(tmp_path, sam_variant="random", sam_rho=0.1)
    trainer.train()
    stepped = [log for log in logs.logs if "perturbation_norm" in log]
    assert len(stepped) == 4
    assert [log["perturbation_norm"] for log in stepped] == pytest.approx([0.1] * 4, rel=1e-5)
    weights = [p for p in trainer.model.parameters() if p.ndim > 1]
    kept = sum(random_kept_count(p.numel(), 0.95) for p in weights) / sum(p.numel() for p in weights)
    assert stepped[0]["zsam_kept_fraction"] == pytest.approx(kept)
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "random-mask control" in card and "zsam_quantile" in card


def test_sam_with_the_per_tensor_split_climbs_about_rho_sqrt_t(tmp_path):
    trainer, logs = _train(tmp_path, sam_variant="sam", zsam_normalization="tensor", sam_rho=0.05)
    trainer.train()
    norms = [log["perturbation_norm"] for log in logs.logs if "perturbation_norm" in log]
    t = sum(p.ndim > 1 for p in trainer.model.parameters())  # 2 weight matrices, 2 biases
    for norm in norms:  # weights: rho each; biases share rho by their part of ||g||
        assert 0.05 * math.sqrt(t) < norm < 0.05 * math.sqrt(t + 1)
    assert trainer.args.sam_hyperparameters()["zsam_normalization"] == "tensor"


@pytest.mark.parametrize(
    "variant, normalization", [("random", "global"), ("random", "tensor"), ("sam", "tensor")]
)
def test_the_controls_resume_exactly(tmp_path, variant, normalization):
    settings = dict(
        sam_variant=variant, zsam_normalization=normalization, save_strategy="steps", save_steps=2
    )
    straight, _ = _train(tmp_path / "straight", **settings)
    straight.train()
    first, _ = _train(tmp_path / "killed", **{**settings, "max_steps": 4})
    first.train()
    resumed, _ = _train(tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "killed" / "out" / "checkpoint-2"))
    assert_identical(dict(resumed.model.state_dict()), dict(straight.model.state_dict()))


def test_the_random_control_is_refused_under_fsdp2(tmp_path):
    args = make_args(tmp_path, sam_variant="random")
    with pytest.raises(ValueError, match="sam_variant='random' .* not supported under FSDP2"):
        _check_backend(args, deepspeed=False, fsdp_version=2)
