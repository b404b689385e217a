"""Shared by the zoo tests: one CPU thread per test (tiny models run fastest so, and the
machine is shared), and the arguments of ``fastattn train TASK`` as the CLI parses them."""

import argparse

import pytest
import torch

from fastattn.zoo.cli import task_parser

TINY_COPY = [
    "--symbols", "8", "--lengths", "1", "5", "--train-size", "96", "--test-size", "24",
    "--embedding-size", "8", "--hidden-size", "12", "--batch-size", "16", "--quiet",
]


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def train_arguments(task: str, *flags: str) -> argparse.Namespace:
    args = task_parser(task, argparse.ArgumentParser).parse_args(list(flags))
    args.task = task
    return args
