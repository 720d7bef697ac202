"""The end-to-end script: datasets, models, reload, card, bad input, Hub boundary, processes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset, Features, Image, Value
from image_data import cifar10_like, cifar100_like, synthetic_images, tiny_imagenet_like
from transformers import AutoImageProcessor, AutoModelForImageClassification, HfArgumentParser

from zsam_hf import ZSAMTrainingArguments
from zsam_hf.card import redact_command
from zsam_hf.vision.data import FASHION_MNIST_LABELS, load_image_dataset
from zsam_hf.vision.image_classification import DataArguments, ModelArguments

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPT = ROOT / "scripts" / "train_image_classification.py"
FAST = [
    "--max_steps",
    "3",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "16",
    "--eval_strategy",
    "no",
    "--save_strategy",
    "no",
    "--use_cpu",
    "--disable_tqdm",
    "true",
    "--logging_steps",
    "1",
]


def load_script():
    spec = importlib.util.spec_from_file_location("train_image_classification", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def datasets_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "cifar10": str(cifar10_like(root / "cifar10")),
        "cifar100": str(cifar100_like(root / "cifar100")),
        "tiny": str(tiny_imagenet_like(root / "tiny")),
    }


def reload_accuracy(
    output_dir: Path, dataset: str, split: str, image_column: str, label_column: str
) -> float:
    """Accuracy of the saved checkpoint, reloaded through the Auto classes and its own processor."""
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    data = load_image_dataset(dataset)[split]
    images = [img.convert("RGB") for img in data[image_column]]
    with torch.no_grad():
        pixels = processor(images, return_tensors="pt")["pixel_values"]
        logits = model(pixel_values=pixels).logits
    return float((logits.argmax(-1).numpy() == np.asarray(data[label_column])).mean())


# ---- models x local datasets through the one script --------------------------------------
@pytest.mark.parametrize(
    "model,dataset,image_column,label_column,test_split",
    [
        ("cifar_resnet20", "cifar10", "img", "label", "test"),
        ("paper_vit", "cifar100", "img", "fine_label", "test"),
        ("resnet18", "tiny", "image", "label", "validation"),
    ],
)
def test_models_train_on_hub_shaped_local_data_and_reload(
    script, datasets_dir, tmp_path, model, dataset, image_column, label_column, test_split
):
    out = tmp_path / "run"
    argv = [
        "--dataset_name",
        datasets_dir[dataset],
        "--model_name_or_path",
        model,
        "--output_dir",
        str(out),
        "--eval_split",
        test_split,
        "--augment",
        "false",
        *FAST,
    ]
    assert script.main(argv) == 0
    for name in ("config.json", "model.safetensors", "README.md", "eval_results.json"):
        assert (out / name).exists(), name
    # timm models keep their preprocessing in config.json (pretrained_cfg) instead
    assert (out / "preprocessor_config.json").exists() != (model == "resnet18")
    config = json.loads((out / "config.json").read_text())
    names = load_image_dataset(datasets_dir[dataset])["train"].features[label_column].names
    saved_names = config.get("label_names") or [
        config["id2label"][str(i)] for i in range(len(config["id2label"]))
    ]
    assert saved_names == names  # timm configs keep label_names, the others id2label
    recorded = json.loads((out / "eval_results.json").read_text())["eval_accuracy"]
    assert reload_accuracy(
        out, datasets_dir[dataset], test_split, image_column, label_column
    ) == pytest.approx(recorded)
    state = json.loads((out / "trainer_state.json").read_text())
    assert any("sharpness" in h for h in state["log_history"])  # it trained with ZSAM


def test_card_is_right_for_a_model_trained_from_scratch(script, datasets_dir, tmp_path):
    out = tmp_path / "card"
    argv = [
        "--dataset_name",
        datasets_dir["cifar10"],
        "--output_dir",
        str(out),
        "--zsam_quantile",
        "0.9",
        "--sam_rho",
        "0.1",
        *FAST,
    ]
    assert script.main(argv) == 0
    card = (out / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-classification"
    assert {"zsam", "sharpness-aware-minimization"} <= set(meta["tags"])
    assert "base_model" not in meta and "fine-tuned version of" not in body and "trained from scratch" in body
    results = meta["model-index"][0]["results"]
    test_acc = json.loads((out / "test_results.json").read_text())["test_accuracy"]
    assert {"test"} <= {r["dataset"]["split"] for r in results}
    assert [m["value"] for r in results if r["dataset"]["split"] == "test" for m in r["metrics"]][0] == round(
        test_acc, 4
    )
    for row in (
        "| zsam_quantile | 0.9 |",
        "| sam_rho | 0.1 |",
        "| zsam_normalization | global |",
        "| optimizer |",
    ):
        assert row in body
    assert (
        "--zsam_quantile 0.9" in body
        and "@article{yun2025zsharp" in body
        and "@inproceedings{foret2021sam" in body
    )


def test_card_metadata_for_a_fine_tuned_hub_model():
    from zsam_hf.card import CardContext, render_model_card

    card = render_model_card(
        CardContext(
            model_name="m",
            sam={"sam_variant": "sam", "sam_rho": 0.05},
            training={"learning_rate": 1e-4},
            dataset="uoft-cs/cifar10",
            base_model="google/vit-base-patch16-224-in21k",
            metrics={"test": {"accuracy": 0.9}},
        )
    )
    meta = yaml.safe_load(card.split("---\n", 2)[1])
    assert meta["base_model"] == "google/vit-base-patch16-224-in21k" and meta["datasets"] == [
        "uoft-cs/cifar10"
    ]
    assert "fine-tuned version of [google/vit-base-patch16-224-in21k]" in card


def test_a_built_wheel_carries_the_card_template_and_the_c_loops(tmp_path):
    """A regular (non-editable) install has no repository around it: the template and the C source of the
    CPU filter's loops must ship inside."""
    root = ROOT
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            str(root),
            "-w",
            str(tmp_path / "wheel"),
        ],
        check=True,
        capture_output=True,
    )
    [wheel] = (tmp_path / "wheel").glob("zsam_hf-*.whl")
    import zipfile

    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = (
        "import zsam_hf.card as c; "
        "print(c.__file__); "
        "print(c.render_model_card(c.CardContext(model_name='m', sam={'sam_variant': 'zsam'}, training={}))); "
        "from zsam_hf.selection import kernel; print('compiled loops from', kernel.SOURCE, kernel.library())"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out.startswith(str(tmp_path / "site"))  # the wheel's copy, not the repository's
    assert "Z-Score Filtered Sharpness-Aware Minimization" in out and "trained from scratch" in out
    # the C source ships in the wheel, and is built from there
    assert f"compiled loops from {tmp_path / 'site'}" in out and "CDLL" in out


def test_command_in_card_never_carries_a_token():
    line = redact_command(["train.py", "--hub_token", "hf_secret", "--token=hf_other", "--lr", "1"])
    assert "hf_secret" not in line and "hf_other" not in line and "--hub_token '<redacted>'" in line


# ---- built-in data -----------------------------------------------------------------------------
def test_builtin_fashion_mnist_from_debian_files():
    data = load_image_dataset("fashion_mnist")
    assert (len(data["train"]), len(data["test"])) == (60000, 10000)
    assert data["train"].features["label"].names == FASHION_MNIST_LABELS
    assert data["train"][0]["image"].size == (28, 28)


def test_builtin_digits():
    data = load_image_dataset("digits")
    assert len(data["train"]) + len(data["test"]) == 1797
    assert data["train"][0]["image"].size == (8, 8)


def test_no_arguments_runs_the_offline_demo(script, monkeypatch, tmp_path):
    demo = [a if a != "outputs/zsam-fashion-mnist-demo" else str(tmp_path / "demo") for a in script.DEMO_ARGS]
    monkeypatch.setattr(
        script, "DEMO_ARGS", demo + ["--max_steps", "2", "--max_eval_samples", "50", "--use_cpu"]
    )
    assert script.main([]) == 0
    assert (tmp_path / "demo" / "README.md").exists() and (tmp_path / "demo" / "model.safetensors").exists()


def test_arguments_from_json_and_yaml_files(script, tmp_path):
    values = {
        "dataset_name": "digits",
        "model_name_or_path": "vgg16_bn",
        "output_dir": str(tmp_path),
        "sam_variant": "sam",
    }
    for name, text in (("a.json", json.dumps(values)), ("a.yaml", yaml.safe_dump(values))):
        (tmp_path / name).write_text(text)
        model_args, data_args, training_args, _ = script.parse([str(tmp_path / name)])
        assert (model_args.model_name_or_path, data_args.dataset_name, training_args.sam_variant) == (
            "vgg16_bn",
            "digits",
            "sam",
        )
        assert training_args.remove_unused_columns is False  # the script's defaults still apply


def test_help_documents_every_flag(script):
    parser = HfArgumentParser((ModelArguments, DataArguments, ZSAMTrainingArguments))
    text = parser.format_help()
    for cls in (ModelArguments, DataArguments):
        for name in cls.__dataclass_fields__:
            assert f"--{name}" in text
            assert cls.__dataclass_fields__[name].metadata.get("help"), name


# ---- bad input -----------------------------------------------------------------------------------
def _bad_dataset(tmp_path, kind: str) -> str:
    images, labels = synthetic_images(12, 32, 3, 0)
    if kind == "no_image":
        ds = Dataset.from_dict({"text": ["a"] * 12, "label": labels})
    elif kind == "string_label":
        ds = Dataset.from_dict(
            {"img": images, "label": [str(x) for x in labels]},
            features=Features({"img": Image(), "label": Value("string")}),
        )
    path = tmp_path / kind
    ds.save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize(
    "case,extra,expected",
    [
        (
            "unknown dataset",
            ["--dataset_name", "no-such-owner/no-such-dataset"],
            "dataset_name='no-such-owner/no-such-dataset'",
        ),
        ("missing path", ["--dataset_name", "./does/not/exist"], "no such file or directory"),
        ("no image column", ["--dataset_name", "@no_image"], "pass --image_column_name"),
        ("string labels", ["--dataset_name", "@string_label"], "label_column_name='label'"),
        (
            "image column without images",
            ["--dataset_name", "@cifar10", "--image_column_name", "label"],
            "not images",
        ),
        (
            "missing label column",
            ["--dataset_name", "@cifar10", "--label_column_name", "nope"],
            "label_column_name='nope'",
        ),
        ("zero samples", ["--dataset_name", "@cifar10", "--max_train_samples", "0"], "max_train_samples=0"),
        (
            "unknown model",
            ["--dataset_name", "@cifar10", "--model_name_or_path", "no_such_model_xyz"],
            "model_name_or_path",
        ),
        ("bad variant", ["--dataset_name", "@cifar10", "--sam_variant", "gsam"], "sam_variant='gsam'"),
    ],
)
def test_bad_input_fails_before_training_and_leaves_nothing(
    script, datasets_dir, tmp_path, capsys, case, extra, expected
):
    extra = [_resolve(a, datasets_dir, tmp_path) for a in extra]
    out = tmp_path / "out"
    assert script.main([*extra, "--output_dir", str(out), *FAST]) != 0
    assert expected in capsys.readouterr().err
    assert not out.exists()


def _resolve(arg: str, datasets_dir, tmp_path) -> str:
    if not arg.startswith("@"):
        return arg
    name = arg[1:]
    return datasets_dir[name] if name in datasets_dir else _bad_dataset(tmp_path, name)


def test_checkpoint_with_other_label_count_needs_ignore_mismatched_sizes(
    script, datasets_dir, tmp_path, capsys
):
    first = tmp_path / "six_labels"
    assert script.main(["--dataset_name", datasets_dir["cifar100"], "--output_dir", str(first), *FAST]) == 0
    out = tmp_path / "finetune"
    argv = [
        "--dataset_name",
        datasets_dir["cifar10"],
        "--model_name_or_path",
        str(first),
        "--output_dir",
        str(out),
        *FAST,
    ]
    assert script.main(argv) != 0
    assert "--ignore_mismatched_sizes" in capsys.readouterr().err and not out.exists()
    assert script.main([*argv, "--ignore_mismatched_sizes"]) == 0
    card = (out / "README.md").read_text()
    assert len(json.loads((out / "config.json").read_text())["id2label"]) == 3
    assert "fine-tuned version of" in card


# ---- the Hub boundary ------------------------------------------------------------------------------
class FakeHub:
    """Stands in for huggingface_hub.HfApi: records what would be created and uploaded."""

    def __init__(self):
        self.repos, self.uploads = [], []

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        self.repos.append((repo_id, token))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, token=None, ignore_patterns=(), **kwargs):
        files = {
            str(p.relative_to(folder_path)): p.read_bytes()
            for p in Path(folder_path).rglob("*")
            if p.is_file()
        }
        self.uploads.append({"repo_id": repo_id, "files": files, "ignore": ignore_patterns})
        return None


def test_push_to_hub_uploads_checkpoint_and_card_without_the_token(
    script, datasets_dir, tmp_path, monkeypatch, capfd
):
    import transformers.trainer

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    secret = "hf_sEcReT_tOkEn_123"
    monkeypatch.setenv("HF_TOKEN", secret)
    out = tmp_path / "push"
    argv = [
        "--dataset_name",
        datasets_dir["cifar10"],
        "--output_dir",
        str(out),
        "--push_to_hub",
        "--hub_model_id",
        "someone/zsam-cifar",
        "--hub_token",
        secret,
        *FAST,
    ]
    assert script.main(argv) == 0
    assert hub.repos[0][0] == "someone/zsam-cifar"
    upload = hub.uploads[-1]
    assert upload["repo_id"] == "someone/zsam-cifar"
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= set(
        upload["files"]
    )
    assert b"zsam" in upload["files"]["README.md"]
    for name, content in upload["files"].items():
        assert secret.encode() not in content, name
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    captured = capfd.readouterr()
    assert secret not in captured.out and secret not in captured.err


# ---- several processes -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "launcher",
    [
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "0",
        ],
    ],
    ids=["torchrun", "accelerate"],
)
def test_two_process_run_end_to_end(datasets_dir, tmp_path, launcher):
    out = tmp_path / "ddp"
    cmd = [*launcher, str(SCRIPT), "--dataset_name", datasets_dir["cifar10"], "--output_dir", str(out), *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert args.world_size == 2
    assert (out / "README.md").exists() and "| num_devices | 2 |" in (out / "README.md").read_text()


def test_training_augmentation_depends_only_on_seed_epoch_and_row():
    from zsam_hf.vision.data import SeededAugmentation, image_transform

    images, _ = synthetic_images(2, 32, 3, 0)
    augment = SeededAugmentation(image_transform(32, (0.5,) * 3, (0.25,) * 3, 3, train=True), seed=7)
    first = augment(images[0], row=5)
    torch.manual_seed(123)  # the global RNG stream has moved on: no effect on the draws
    torch.rand(1000)
    assert torch.equal(augment(images[0], row=5), first)
    draws = [augment(images[0], row=r) for r in range(8)]
    assert any(not torch.equal(d, first) for d in draws)  # rows get their own crops and flips
    augment.epoch = 1
    assert any(not torch.equal(augment(images[0], row=r), d) for r, d in enumerate(draws))  # and epochs
