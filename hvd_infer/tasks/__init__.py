"""Tasks, registered by name: what turns model outputs into prediction columns.

A new task is one new module here with a `Task` subclass, plus a line below.
The registry holds names only, so the config can be validated before torch loads.
"""
import importlib

TASKS = {
    "text-classification": "hvd_infer.tasks.text_classification:TextClassification",
    "embedding": "hvd_infer.tasks.embedding:Embedding",
    "zero-shot-classification": "hvd_infer.tasks.zero_shot:ZeroShotClassification",
    "text-generation": "hvd_infer.tasks.generation:TextGeneration",
    "token-classification": "hvd_infer.tasks.token_classification:TokenClassification",
}


def get_task(name: str):
    """The Task class registered under name."""
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)
