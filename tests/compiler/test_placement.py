"""The compiled plan's rank layout (compiler/placement.py): what it records, the layouts refused
or warned about, where the report and the launch scripts show it, and the cost model's
inter-node rates following it."""

from __future__ import annotations

import pytest

from zeroplan.compiler.cost import _spans_nodes
from zeroplan.compiler.emit import render
from zeroplan.schemas import ClusterSpec, ConfigError, ModelSpec

PP2 = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 1},
       "parallel": {"pp": 2, "tp": 2}}
TP4 = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 0}, "parallel": {"tp": 4}}


def _with_layout(data: dict, order: list[str]) -> dict:
    return {**data, "parallel": {**data["parallel"], "layout": order}}


def test_a_two_node_plan_records_megatrons_layout_and_its_nodes(compile_dict):
    plan = compile_dict(PP2, nnodes=2, nproc_per_node=4)
    assert plan.layout.order == ("pp", "dp", "tp")
    assert plan.layout.nodes == ((0, 3), (4, 7))
    assert plan.layout.crosses_nodes == ("pp",)  # each node holds one pipeline stage; tp and dp stay inside
    assert compile_dict(PP2, nproc_per_node=8).layout.crosses_nodes == ()


def test_a_given_order_is_recorded_and_changes_what_crosses(compile_dict):
    plan = compile_dict(_with_layout(PP2, ["dp", "pp", "tp"]), nnodes=2, nproc_per_node=4)
    assert plan.layout.order == ("dp", "pp", "tp") and plan.layout.crosses_nodes == ("dp",)


@pytest.mark.parametrize("order", [["tp", "dp", "pp"], ["tp", "pp", "dp"]])
def test_an_order_that_splits_tp_needlessly_is_refused(compile_dict, order):
    with pytest.raises(ConfigError) as e:
        compile_dict(_with_layout(PP2, order), nnodes=2, nproc_per_node=4)
    text = str(e.value)
    assert f"parallel.layout: {order} puts tp group" in text and "on nodes 0, 1" in text
    assert "['pp', 'dp', 'tp'] keeps every tp(2) group inside one of the nproc_per_node(4) ranks" in text
    assert "put tp last in parallel.layout" in text


def test_an_order_keeping_tp_inside_nodes_is_accepted_and_any_order_on_one_node(compile_dict):
    # tp in the middle: its groups take every dp-th rank, still within a node of 4
    assert compile_dict(_with_layout(PP2, ["pp", "tp", "dp"]), nnodes=2, nproc_per_node=4).layout.crosses_nodes == ("pp",)
    assert compile_dict(_with_layout(PP2, ["tp", "dp", "pp"]), nproc_per_node=8).layout.crosses_nodes == ()


def test_not_an_order_is_refused_at_validation(compile_dict):
    with pytest.raises(ConfigError, match=r"parallel.layout: \['pp', 'tp'\] is not an order of"):
        compile_dict(_with_layout(PP2, ["pp", "tp"]))


def test_tp_straddling_nodes_warns_naming_a_group_and_the_degrees_that_fit(compile_dict):
    plan = compile_dict(TP4, nnodes=2, nproc_per_node=6)
    assert plan.layout.crosses_nodes == ("dp", "tp")
    assert ("tp(4) does not divide nproc_per_node(6): 1 tp group(s), e.g. ranks [4, 5, 6, 7] on nodes 0, 1, "
            "all-reduce across nodes in every block; choose parallel.tp among [2, 3, 6]") in plan.estimates.warnings
    assert not [w for w in compile_dict(TP4, nnodes=2, nproc_per_node=4).estimates.warnings if "divide" in w]


@pytest.mark.parametrize("shape", [dict(nnodes=2, nproc_per_node=4), dict(nnodes=2, nproc_per_node=6),
                                   dict(nnodes=4, nproc_per_node=2), dict(nproc_per_node=8)])
def test_the_cost_models_inter_node_groups_are_the_layouts(compile_dict, shape):
    for data in (PP2, TP4):
        try:
            plan = compile_dict(data, **shape)
        except ConfigError:
            continue  # degrees that do not divide this world
        assert [d for d in ("pp", "dp", "tp") if _spans_nodes(plan, d)] == list(plan.layout.crosses_nodes)


def test_the_report_and_the_launch_scripts_show_the_layout(compile_dict, config_of):
    config = config_of(PP2)
    model, cluster = ModelSpec.load("tiny"), ClusterSpec.load("cpu").with_shape(nnodes=2, nproc_per_node=4)
    plan = compile_dict(PP2, nnodes=2, nproc_per_node=4)
    files = render(plan, config=config, model=model, cluster=cluster)
    assert ("| rank layout | pp, dp, tp (slowest first, tp fastest); pp groups cross nodes | default (Megatron-LM's: "
            "tp within a node); node 0: ranks 0-3; pp 0, dp 0-1, tp 0-1; node 1: ranks 4-7; pp 1, dp 0-1, tp 0-1 |"
            ) in files["report.md"]
    line = "# Plan: node n runs ranks n x 4 onwards; layout pp, dp, tp (slowest first): pp groups cross nodes"
    assert line in files["launch.sh"] and line in files["launch.sbatch"]
