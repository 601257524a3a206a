"""The Prefect UI's run form, read from the parameter schema Prefect builds for the flow: what a person sees first,
the variant list as one tab per method, and an output folder of the run's own."""

from datetime import datetime
from pathlib import Path

import pytest
from prefect.utilities.callables import parameter_schema

from flows.quantize import quantflow_run
from quantflow.spec import METHODS, RunSpec, parse_spec

FIRST_SCREEN = 12


@pytest.fixture(scope="module")
def schema() -> dict:
    return parameter_schema(quantflow_run).model_dump_for_openapi()


def resolved(schema: dict, node: dict) -> dict:
    return schema["definitions"][node["$ref"].rsplit("/", 1)[-1]] if "$ref" in node else node


def branches(schema: dict) -> list[dict]:
    items = schema["definitions"]["RunSpec"]["properties"]["variants"]["items"]
    return [resolved(schema, branch) for branch in items["oneOf"]]


def ui_tab(value: dict, tabs: list[dict]) -> int:
    """The tab Prefect's form (3.9, V2 UI) opens for an item: the branch sharing most property names, first on a tie."""
    best, shared = 0, 0
    for index, tab in enumerate(tabs):
        count = len(set(value) & set(tab.get("properties", {})))
        if count > shared:
            best, shared = index, count
    return best


def test_variants_are_one_tab_per_method_each_with_a_method_dropdown(schema):
    items = schema["definitions"]["RunSpec"]["properties"]["variants"]["items"]
    assert items["discriminator"]["propertyName"] == "method"
    tabs = branches(schema)
    enums = [tab["properties"]["method"]["enum"] for tab in tabs]
    assert sorted(m for enum in enums for m in enum) == sorted(METHODS)
    assert all("const" not in tab["properties"]["method"] for tab in tabs)
    titles = [tab["title"] for tab in tabs]
    assert not any(title.endswith("Variant") for title in titles) and len(set(titles)) == len(titles)


def test_a_new_item_and_every_tab_start_from_a_valid_variant(schema):
    """'Add item' and a click on a method's tab fill in defaults that run as they stand (no blank item)."""
    items = schema["definitions"]["RunSpec"]["properties"]["variants"]["items"]
    for default in [items["default"], *(tab["default"] for tab in branches(schema))]:
        spec = parse_spec({"variants": [default]})
        assert spec.variants[0].method == default["method"]


@pytest.mark.parametrize("method", METHODS)
def test_the_form_opens_each_variant_on_its_own_tab(schema, method):
    tabs = branches(schema)
    value = parse_spec({"variants": [{"method": method}]}).variants[0].model_dump(mode="json")
    assert method in tabs[ui_tab(value, tabs)]["properties"]["method"]["enum"]


def leaf_count(schema: dict, node: dict) -> int:
    node = resolved(schema, node)
    return sum(leaf_count(schema, child) for child in node["properties"].values()) if "properties" in node else 1


def test_the_first_screen_shows_at_most_twelve_fields_then_the_advanced_ones(schema):
    properties = schema["definitions"]["RunSpec"]["properties"]
    ordered = sorted(properties.values(), key=lambda p: p["position"])
    first = [p for p in ordered if not p["title"].startswith("Advanced")]
    assert ordered[: len(first)] == first  # the advanced settings come after, together
    assert [p["title"] for p in first] == ["Model", "Variants", "Output", "Device"]
    assert sum(leaf_count(schema, p) for p in first) <= FIRST_SCREEN


def test_hints_hold_no_markup_the_form_would_swallow(schema):
    """The form renders hints as markdown: '<dataset>' vanished as an HTML tag."""

    def hints(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from [value] if key == "description" else hints(value)
        elif isinstance(node, list):
            for value in node:
                yield from hints(value)

    assert [h for h in hints(schema) if "<" in h or ">" in h] == []


def test_the_default_output_is_a_fresh_folder_per_run_never_the_demos(tmp_path, monkeypatch):
    from quantflow.devtools.demo import demo_spec
    from quantflow.spec import with_output_folder

    monkeypatch.chdir(tmp_path)
    served = demo_spec()  # the served deployment's form opens on this
    assert served.output.dir == RunSpec().output.dir != Path("runs/demo")
    first = with_output_folder(served, datetime(2026, 12, 4, 10, 15, 0)).output.dir
    assert first == Path("runs/smollm2-135m-20261204-101500")
    first.mkdir(parents=True)
    again = with_output_folder(served, datetime(2026, 12, 4, 10, 15, 0)).output.dir
    assert again == Path("runs/smollm2-135m-20261204-101500-2")
    later = with_output_folder(served, datetime(2026, 12, 4, 10, 16, 0)).output.dir
    assert later != first and later.parent == Path("runs")
    assert demo_spec(Path("runs/demo")).output.dir == Path("runs/demo")  # `quantflow demo` keeps its folder
    chosen = served.model_copy(update={"output": served.output.model_copy(update={"dir": Path("out/x")})})
    assert with_output_folder(chosen, datetime(2026, 12, 4)).output.dir == Path("out/x")
