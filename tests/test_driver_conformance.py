"""What every registered driver owes the project, checked for all of them at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusedisk.graph.node import DATA_OPERATIONS, Filter, Node
from fusedisk.graph.registry import drivers

DOCS = Path(__file__).parent.parent / "docs" / "drivers"


@pytest.mark.parametrize("name", sorted(drivers()))
def test_every_driver_has_a_documentation_page(name):
    page = DOCS / f"{name}.md"
    assert page.exists(), f"docs/drivers/{name}.md is missing"
    text = page.read_text()
    for option in drivers()[name].option_specs:
        assert f"`{option}`" in text, f"docs/drivers/{name}.md does not document `{option}`"


@pytest.mark.parametrize("name", sorted(drivers()))
def test_data_changing_drivers_implement_every_operation(name):
    cls = drivers()[name]
    if issubclass(cls, Filter):
        return  # presents its child's data unchanged: forwarding is safe
    missing = [op for op in DATA_OPERATIONS if getattr(cls, op) is getattr(Node, op)]
    assert not missing, f"driver {name} changes data but does not implement {missing}"


@pytest.mark.parametrize("name", sorted(drivers()))
def test_every_option_has_help(name):
    for option in drivers()[name].option_specs.values():
        assert option.help, f"driver {name}: option {option.name} has no help text"
