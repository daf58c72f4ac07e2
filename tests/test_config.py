"""SLM360Classifier settings (slm360_rasa/config.py): one declaration per key, checked, coerced."""
import ast
import inspect
from dataclasses import fields

import pytest

import slm360_rasa.config as C
from slm360_rasa.config import FinetuneConfig, ServingConfig, classifier_defaults, from_component_config


def test_config_validation_names_the_key():
    for key, bad in [("epochs", 0), ("freeze_layers", -1), ("oos_quantile", 0.9), ("holdout_fraction", 0.7),
                     ("holdout_max", -1), ("replay_size", 1.5), ("ewc_lambda", -1.0), ("ewc_lambda", float("inf")),
                     ("max_forgetting", 2.0), ("fisher_examples", 0), ("max_length", 513), ("max_length", 2),
                     ("batch_size", True), ("learning_rate", 0.0), ("warmup_ratio", 1.0), ("random_seed", "x"),
                     ("intent_classification", 1), ("replay_ratio", float("nan"))]:
        with pytest.raises(ValueError, match=key):
            FinetuneConfig(**{key: bad})
    for key, bad in [("precision", "int8"), ("ranking_length", -1), ("mode", "fast"), ("checkpoint", " ")]:
        with pytest.raises(ValueError, match=key):
            ServingConfig(**{key: bad})
    assert FinetuneConfig(max_forgetting=None).max_forgetting is None


def test_the_component_defaults_are_both_dataclasses_with_no_key_declared_twice():
    serving = {f.name for f in fields(ServingConfig)}
    training = {f.name for f in fields(FinetuneConfig)}
    assert not serving & training
    assert set(classifier_defaults()) == serving | training
    assert from_component_config(classifier_defaults()) == (ServingConfig(), FinetuneConfig())


def test_every_key_has_a_comment_over_its_declaration():
    source = inspect.getsource(C)
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name in ("ServingConfig", "FinetuneConfig"):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign):
                    above = lines[stmt.lineno - 2].strip()
                    assert above.startswith("#"), f"{node.name}.{stmt.target.id} has no comment over it"


def test_yaml_values_are_coerced_losslessly_and_named_when_they_cannot_be():
    serving, training = from_component_config({**classifier_defaults(), "learning_rate": "1e-3", "epochs": 12.0,
                                               "name": "slm360_rasa.SLM360Classifier",
                                               "finetuning_epoch_fraction": 0.5})
    assert training.learning_rate == 0.001 and training.epochs == 12 and isinstance(training.epochs, int)
    for key, bad in [("epochs", 10.5), ("learning_rate", "fast"), ("learning_rate", True), ("oos_quantile", "x")]:
        with pytest.raises(ValueError, match=f"SLM360Classifier: invalid configuration: {key} must be"):
            from_component_config({**classifier_defaults(), key: bad})


def test_an_unknown_key_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epoch'\]"):
        from_component_config({**classifier_defaults(), "epoch": 3})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['epoch'\]"):
        FinetuneConfig.from_dict({"epoch": 3})
