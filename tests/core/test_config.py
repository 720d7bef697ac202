"""ZSAMTrainingArguments: flags, defaults and clear errors for bad values."""

import json

import pytest
from transformers import HfArgumentParser

from zsam_hf import ZSAMTrainingArguments


def make(tmp_path, **kw):
    return ZSAMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kw)


@pytest.mark.parametrize("variant,rho", [("zsam", 0.05), ("sam", 0.05), ("fsam", 0.05), ("asam", 0.5)])
def test_rho_defaults_per_variant(tmp_path, variant, rho):
    assert make(tmp_path, sam_variant=variant).sam_rho == rho
    assert make(tmp_path, sam_variant=variant, sam_rho=0.2).sam_rho == 0.2


def test_defaults_follow_the_paper(tmp_path):
    args = make(tmp_path)
    assert (args.sam_variant, args.zsam_quantile, args.zsam_normalization, args.sam_sync_ascent) == (
        "zsam",
        0.95,
        "global",
        None,  # per replica under DDP; the averaged gradient under FSDP2
    )
    assert (args.asam_eta, args.fsam_sigma, args.fsam_lambda) == (0.01, 1.0, 0.9)


@pytest.mark.parametrize(
    "field,value,allowed",
    [
        ("sam_variant", "gsam", "zsam, sam, asam, fsam, random, none"),
        ("sam_rho", 0.0, "> 0"),
        ("sam_rho", -1.0, "> 0"),
        ("sam_rho", float("nan"), "> 0"),
        ("zsam_quantile", 1.0, "[0, 1)"),
        ("zsam_quantile", -0.1, "[0, 1)"),
        ("zsam_normalization", "layer", "global, tensor"),
        ("asam_eta", -0.5, ">= 0"),
        ("fsam_sigma", float("inf"), ">= 0"),
        ("fsam_lambda", 1.0, "[0, 1)"),
        ("sam_sync_ascent", "yes", "True, False or None"),
        ("sam_interval", 0, "whole number >= 1"),
        ("sam_interval", -3, "whole number >= 1"),
        ("sam_interval", 2.5, "whole number >= 1"),
        ("sam_interval", True, "whole number >= 1"),
        ("sam_start", -1, "whole number of optimizer steps >= 0, or a fraction of the run in (0, 1)"),
        ("sam_start", 1.5, "fraction of the run in (0, 1)"),
        ("sam_start", float("nan"), "fraction of the run in (0, 1)"),
        ("sam_start", True, "fraction of the run in (0, 1)"),
        ("sam_start", "half", "fraction of the run in (0, 1)"),
    ],
)
def test_bad_values_name_field_value_and_what_is_allowed(tmp_path, field, value, allowed):
    with pytest.raises(ValueError) as info:
        make(tmp_path, **{field: value})
    message = str(info.value)
    assert message.startswith(f"{field}={value!r}") and allowed in message


def test_flags_parse_from_command_line_and_json(tmp_path):
    parser = HfArgumentParser(ZSAMTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--sam_variant",
            "asam",
            "--asam_eta",
            "0.1",
            "--sam_sync_ascent",
            "true",
            "--sam_interval",
            "5",
            "--sam_start",
            "500",
            "--use_cpu",
            "--report_to",
            "none",
        ]
    )
    assert (args.sam_variant, args.sam_rho, args.asam_eta, args.sam_sync_ascent) == ("asam", 0.5, 0.1, True)
    assert args.sam_interval == 5
    assert args.sam_start == 500 and isinstance(args.sam_start, int)  # a step index, not 500.0
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), "zsam_quantile": 0.9, "use_cpu": True}))
    (args,) = parser.parse_json_file(str(path))
    assert args.zsam_quantile == 0.9
    help_text = parser.format_help()
    for flag in (
        "--sam_variant",
        "--sam_rho",
        "--zsam_quantile",
        "--zsam_normalization",
        "--asam_eta",
        "--fsam_sigma",
        "--fsam_lambda",
        "--sam_sync_ascent",
        "--sam_interval",
        "--sam_start",
    ):
        assert flag in help_text


def test_sam_hyperparameters_lists_what_the_variant_uses(tmp_path):
    assert make(tmp_path).sam_hyperparameters() == {
        "sam_variant": "zsam",
        "sam_rho": 0.05,
        "sam_interval": 1,
        "sam_start": 0,
        "sam_sync_ascent": None,
        "zsam_quantile": 0.95,
        "zsam_normalization": "global",
    }
    assert make(tmp_path, sam_variant="none").sam_hyperparameters() == {"sam_variant": "none"}


def test_pickled_arguments_never_carry_the_hub_token(tmp_path):
    import pickle

    args = make(tmp_path, hub_token="hf_very_secret")
    restored = pickle.loads(pickle.dumps(args))
    assert args.hub_token == "hf_very_secret"  # still usable in memory for push_to_hub
    assert restored.hub_token is None and restored.sam_variant == args.sam_variant
    assert b"hf_very_secret" not in pickle.dumps(args)
