"""zsam-hf as a library: a lean core, task-agnostic cards, a repository that refers only to itself."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from huggingface_hub import ModelCard
from toy import make_args, text_dataset, tiny_bert

from zsam_hf import ZSAMTrainer

ROOT = Path(__file__).resolve().parent.parent.parent
APPLICATION_PACKAGES = ("timm", "datasets", "evaluate", "matplotlib", "torchvision", "sklearn", "PIL")

# Run in a fresh interpreter where the application's packages cannot be imported at all (as in an
# environment with `pip install zsam-hf` and no extras): the core must train without them.
CORE_ONLY = f"""
import sys
BLOCKED = {APPLICATION_PACKAGES!r}
for name in BLOCKED:
    sys.modules[name] = None  # importing it raises ImportError; find_spec says it is not installed
import torch, torch.nn as nn, torch.nn.functional as F
import zsam_hf
from zsam_hf import ZSAMTrainer, ZSAMTrainingArguments

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
    def forward(self, x, labels=None):
        logits = self.fc(x)
        return {{"loss": F.cross_entropy(logits, labels), "logits": logits}}

class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 16
    def __getitem__(self, i):
        x = torch.randn(4, generator=torch.Generator().manual_seed(i))
        return {{"x": x, "labels": int(x[0] > 0)}}

args = ZSAMTrainingArguments(output_dir=sys.argv[1], max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=1)
trainer = ZSAMTrainer(model=Net(), args=args, train_dataset=Data())
trainer.train()
trainer.create_model_card()
assert trainer.state.global_step == 2 and any("sharpness" in h for h in trainer.state.log_history)
imported = [name for name in BLOCKED if sys.modules.get(name) is not None]
assert not imported, imported
print("core-only OK")
"""


def test_core_trains_without_any_application_package(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", CORE_ONLY, str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "core-only OK" in result.stdout
    assert (tmp_path / "README.md").exists()


def test_text_classifier_gets_a_valid_card_without_image_claims(tmp_path):
    model = tiny_bert()

    def compute_metrics(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    args = make_args(tmp_path, max_steps=3, eval_strategy="steps", eval_steps=3)
    trainer = ZSAMTrainer(
        model=model,
        args=args,
        train_dataset=text_dataset(24),
        eval_dataset=text_dataset(16, seed=1),
        compute_metrics=compute_metrics,
    )
    trainer.train()
    trainer.create_model_card(dataset="someone/toy-text")
    path = Path(args.output_dir) / "README.md"
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "text-classification" and data["library_name"] == "transformers"
    assert data["datasets"] == ["someone/toy-text"] and "zsam" in data["tags"]
    [result] = card.data.eval_results
    accuracy = [h["eval_accuracy"] for h in trainer.state.log_history if "eval_accuracy" in h][-1]
    assert (result.task_type, result.metric_type, result.dataset_split) == (
        "text-classification",
        "accuracy",
        "validation",
    )
    assert result.metric_value == round(accuracy, 4)
    assert data["model-index"][0]["results"][0]["task"]["type"] == "text-classification"
    assert "image" not in card.text.lower() and "image" not in str(data).lower()
    assert "was trained from scratch" in card.text and "| sam_variant | zsam |" in card.text


def test_no_test_module_imports_another():
    for path in (ROOT / "tests").rglob("*.py"):
        imports = re.findall(r"^\s*(?:from|import)\s+(test_\w+)", path.read_text(), flags=re.MULTILINE)
        assert not imports, f"{path.relative_to(ROOT)} imports test module(s) {imports}"


def test_documents_and_files_named_in_code_and_docs_exist():
    """Every repository path that code, tests, scripts or the docs name (docs/..., scripts/..., *.md) is there."""
    pattern = re.compile(r"\b((?:docs|scripts|model_cards|tests)/[\w./-]+\.(?:md|py|txt|png|json|jsonl|csv))")
    sources = [*ROOT.glob("zsam_hf/**/*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("tests/**/*.py")]
    sources += [ROOT / "README.md", *ROOT.glob("docs/*.md")]
    for source in sources:
        for named in pattern.findall(source.read_text()):
            assert (ROOT / named).exists(), (
                f"{source.relative_to(ROOT)} names {named}, which is not in the repository"
            )
    assert not [s for s in sources if "SPEC.md" in s.read_text() and s.name != "test_package.py"]


def test_the_api_reference_covers_every_public_name():
    """docs/reference.md has a mkdocstrings entry for each name of zsam_hf.__all__ (mkdocs --strict checks they resolve)."""
    import zsam_hf

    reference = (ROOT / "docs" / "reference.md").read_text()
    missing = [name for name in zsam_hf.__all__ if f"::: zsam_hf.{name}\n" not in reference]
    assert not missing, f"docs/reference.md lacks {missing}"
