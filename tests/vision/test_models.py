"""The model factory: every built-in architecture, timm offline fallback, reload through Auto classes."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from zsam_hf.vision.models import PAPER_MODELS, Preprocessing, build_model, paper_vit_patch_size

LABELS = ["a", "b", "c", "d"]
PREP = Preprocessing(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 3)


@pytest.mark.parametrize("name", list(PAPER_MODELS))
def test_paper_models_build_run_and_reload(name, tmp_path):
    built = build_model(name, LABELS, PREP)
    model = built.model.eval()
    assert built.base_model is None and not built.pretrained
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(pixel_values=x).logits
    assert logits.shape == (2, len(LABELS))
    model.save_pretrained(tmp_path)
    built.image_processor.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=x).logits, logits)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert list(processor.image_mean) == list(PREP.mean) and processor.size["height"] == 32
    assert reloaded.config.id2label == dict(enumerate(LABELS))


def test_paper_model_sizes_match_the_papers():
    counts = {
        n: sum(p.numel() for p in build_model(n, [str(i) for i in range(10)], PREP).model.parameters())
        for n in ("cifar_resnet20", "cifar_resnet56")
    }
    assert abs(counts["cifar_resnet20"] - 0.27e6) < 0.01e6  # He et al. 2016, table 6: 0.27M
    assert abs(counts["cifar_resnet56"] - 0.85e6) < 0.01e6  # 0.85M
    vit = build_model("paper_vit", LABELS, PREP).model
    assert (
        vit.config.num_hidden_layers,
        vit.config.hidden_size,
        vit.config.num_attention_heads,
        vit.config.intermediate_size,
        vit.config.patch_size,
    ) == (7, 384, 12, 384, 8)
    assert [paper_vit_patch_size(s) for s in (28, 32, 64, 224)] == [7, 8, 8, 16]


def test_timm_pretrained_name_falls_back_to_scratch_offline(caplog, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="zsam_hf.vision.models"):
        built = build_model("timm/resnet18.a1_in1k", LABELS, PREP)
    assert not built.pretrained and built.model.config.architecture == "resnet18"
    assert "from scratch" in caplog.text
    assert built.model.eval()(pixel_values=torch.randn(1, 3, 32, 32)).logits.shape == (1, 4)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="model_name_or_path='nope_not_a_model'"):
        build_model("nope_not_a_model", LABELS, PREP)


RELOAD = """
import sys, torch
from PIL import Image
if sys.argv[2] == "import":
    import zsam_hf.vision  # registers the built-in CNNs with the Auto classes
from transformers import AutoModelForImageClassification, pipeline
kwargs = {"trust_remote_code": True} if sys.argv[2] == "remote_code" else {}
model = AutoModelForImageClassification.from_pretrained(sys.argv[1], **kwargs).eval()
x = torch.load(sys.argv[1] + "/probe.pt")
with torch.no_grad():
    assert torch.allclose(model(pixel_values=x["pixels"]).logits, x["logits"], atol=1e-6)
classify = pipeline("image-classification", model=sys.argv[1], **kwargs)
[best, *_] = classify(Image.new("RGB", (32, 32), (200, 30, 30)))
assert best["label"] in ("a", "b", "c", "d"), best
print("zsam_hf" in sys.modules, type(model).__module__, best["label"])
"""


@pytest.mark.parametrize("how", ["import", "remote_code"])
def test_saved_cnn_reloads_in_a_fresh_process_and_classifies_through_a_pipeline(tmp_path, how):
    built = build_model("cifar_resnet20", LABELS, PREP)
    model = built.model.eval()
    model.save_pretrained(tmp_path)
    built.image_processor.save_pretrained(tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.save({"pixels": pixels, "logits": model(pixel_values=pixels).logits}, tmp_path / "probe.pt")
    result = subprocess.run(
        [sys.executable, "-c", RELOAD, str(tmp_path), how], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    imported_us, module, _ = result.stdout.split()
    assert imported_us == str(
        how == "import"
    )  # remote code runs the file saved next to the weights, not ours
    assert module.startswith("zsam_hf.vision" if how == "import" else "transformers_modules")
