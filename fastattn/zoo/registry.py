"""TASK names of ``fastattn train`` -> the Task classes that implement them.

Each entry is "module:Class", imported when first asked for, so that ``fastattn info``
does not import the zoo.  A new task adds one line here.
"""

from __future__ import annotations

import importlib

from fastattn.zoo.task import Task

TASKS = {
    "reverse": "fastattn.zoo.sequence_tasks:ReverseTask",
    "copy": "fastattn.zoo.sequence_tasks:CopyTask",
    "sort": "fastattn.zoo.sequence_tasks:SortTask",
    "translate": "fastattn.zoo.sequence_tasks:TranslateTask",
    "captions": "fastattn.zoo.captions_task:CaptionsTask",
    "autoencoder": "fastattn.zoo.autoencoder_task:AutoencoderTask",
    "lstmn": "fastattn.zoo.lstmn_task:LSTMNTask",
}


def task_class(name: str) -> type[Task]:
    """The Task class registered as ``name``; ValueError naming the known tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    module_name, class_name = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)
