"""Fixtures for the cloud track: each stack's program run once under the plan mocks."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from dualtrack.plan import STACKS, Plan, load_stack_config, run_program


@pytest.fixture(scope="session")
def plans() -> dict[str, Plan]:
    """``{stack: Plan}`` for every committed stack file (the program really runs three times)."""
    return {stack: run_program(stack) for stack in STACKS}


@pytest.fixture
def stack_config() -> Any:
    """A deep copy of a stack file's config, to mutate into a bad variant."""

    def load(stack: str = "dev") -> dict[str, Any]:
        return copy.deepcopy(load_stack_config(stack))

    return load
