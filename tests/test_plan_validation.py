"""apply_plan on hand-edited or corrupted plans: every contradiction is a ValueError naming the
entry, raised before the model changes; valid plans still apply to the same result."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from functools import cache
from typing import Any, cast

import hypothesis
import pytest
import torch
from gating_helpers import examples, inserted_gating, random_gates
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gatedprune as gp
from gatedprune.gating import ResNet1d, apply_plan, export_plan, gate_
from gatedprune.gating.surgery import PLAN_FORMAT

Plan = dict[str, Any]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


class _Aliased(nn.Module):
    """An MLP whose middle layer is also reachable as ``alias`` (one module, two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _mlp()
        self.alias = self.body[2]

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x)
        return out


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return ResNet1d(widths=(8, 16), blocks=(2, 2))


X_MLP = torch.randn(4, 6)
X_RES = torch.randn(2, 1, 32)


@cache
def _mlp_case() -> tuple[Plan, dict[str, Tensor], Tensor]:
    """A valid MLP plan (some channels of both hidden layers closed), the pruned weights and
    the pruned model's output."""
    model = _mlp()
    gate_(model, X_MLP)
    random_gates(model, torch.Generator().manual_seed(1))
    model.eval()
    plan = json.loads(json.dumps(export_plan(model)))
    assert set(plan["slices"]) == {"0", "2", "4"}
    small = gp.prune(model)
    with torch.no_grad():
        return plan, small.state_dict(), small(X_MLP)


@cache
def _resnet_case() -> tuple[Plan, dict[str, Tensor], Tensor]:
    """A valid ResNet plan with channels pruned, a block removed and a new shortcut kept."""
    model = _resnet()
    gate_(model, X_RES, shortcuts="dense")
    random_gates(model, torch.Generator().manual_seed(3), low=-6.0)
    gating = inserted_gating(model)
    with torch.no_grad():
        gating.block_gates[1].log_alpha.fill_(-20.0)  # type: ignore[operator]
        assert gating.edge_gate is not None
        gating.edge_gate.log_alpha.fill_(20.0)  # type: ignore[operator]
    model.eval()
    plan = json.loads(json.dumps(export_plan(model)))
    assert plan["cut"]
    assert plan["edges"]
    assert plan["erase"]
    assert plan["scopes"] == ["stages"]
    small = gp.prune(model)
    with torch.no_grad():
        return plan, small.state_dict(), small(X_RES)


def _mlp_plan() -> Plan:
    return copy.deepcopy(_mlp_case()[0])


def _resnet_plan() -> Plan:
    return copy.deepcopy(_resnet_case()[0])


def _snapshot(model: nn.Module) -> tuple[dict[str, Tensor], list[tuple[str, type]], str]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, [(n, type(m)) for n, m in model.named_modules()], repr(model)


def _refused(
    factory: Callable[[], nn.Module], plan: Plan, match: str, error: type[Exception] = ValueError
) -> None:
    """``apply_plan`` refuses ``plan`` with ``error`` matching ``match``; the model is intact.
    The plans are edited by the tests: with their checksum, any edit is refused as such
    (``test_plan_fingerprint.py``); these test the checks of a plan written by hand, which
    has none, so the checksum is dropped (unless the test's own edit took it out already)."""
    if isinstance(plan, dict) and isinstance(plan.get("checksum"), str):
        plan = {k: v for k, v in plan.items() if k != "checksum"}
    model = factory()
    state, structure, text = _snapshot(model)
    with pytest.raises(error, match=match):
        apply_plan(model, plan)
    after_state, after_structure, after_text = _snapshot(model)
    assert after_structure == structure
    assert after_text == text
    assert after_state.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(after_state[k], v), k


def _matches_reference(model: nn.Module, case: tuple[Plan, dict[str, Tensor], Tensor]) -> None:
    _, state, out = case
    model.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(X_MLP if out.shape[0] == 4 else X_RES), out)


# ------------------------------------------------------------------ valid plans still apply
def test_valid_plans_apply_to_the_pruned_function() -> None:
    _matches_reference(apply_plan(_mlp(), _mlp_plan()), _mlp_case())
    _matches_reference(apply_plan(_resnet(), _resnet_plan()), _resnet_case())


def test_hand_written_plan_without_widths_still_applies() -> None:
    plan = {
        "format": PLAN_FORMAT, "opaque": {}, "cut": {}, "scopes": [], "erase": [],
        "slices": {"0": {"kind": "linear", "in": None, "out": [0, 1]},
                   "2": {"kind": "linear", "in": [0, 1], "out": None}},
    }  # fmt: skip
    net = apply_plan(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), plan)
    assert net[0].out_features == 2
    assert net[2].in_features == 2


# ------------------------------------------------------------------ channel groups
def test_consumer_keeping_other_channels_of_the_same_count_is_refused() -> None:
    # before: applied; the second layer read other channels than the first kept: a model of
    # the right shapes computing another function, silently
    plan = _mlp_plan()
    keep = plan["slices"]["2"]["in"]
    missing = next(i for i in range(16) if i not in keep)
    plan["slices"]["2"]["in"] = sorted([*keep[1:], missing])
    _refused(_mlp, plan, r"module '2' \(slice 'linear'\) keeps input channels .* module '0'")


def test_consumer_keeping_fewer_channels_is_refused() -> None:
    # before: applied; the forward then failed with a matmul shape error
    plan = _mlp_plan()
    plan["slices"]["2"]["in"] = plan["slices"]["2"]["in"][:-1]
    _refused(_mlp, plan, r"inconsistent plan: module '2'")


def test_producer_sliced_but_consumer_not_is_refused() -> None:
    plan = _mlp_plan()
    del plan["slices"]["4"]
    _refused(_mlp, plan, r"module '4' \(not sliced\) keeps input channels")


def test_slicing_the_model_input_or_output_is_refused() -> None:
    plan = _mlp_plan()
    plan["slices"]["0"]["in"] = [0, 1, 2]
    _refused(_mlp, plan, r"module '0' .* reads the model's input")
    plan = _mlp_plan()
    plan["slices"]["4"]["out"] = [0, 2]
    _refused(_mlp, plan, r"the model's output .* keeps channels \[0, 2\] of 3")


def test_batchnorm_disagreeing_with_its_conv_is_refused() -> None:
    plan = _resnet_plan()
    out = plan["slices"]["stem.1"]["out"]
    plan["slices"]["stem.1"]["out"] = [i for i in range(8) if i not in out][: len(out)]
    _refused(_resnet, plan, r"module 'stem.1' \(slice 'bn'\) keeps input channels")


def test_residual_add_of_disagreeing_channels_is_refused() -> None:
    # the second conv of the kept first block against the block's input (identity shortcut)
    plan = _resnet_plan()
    for name in ("stages.0.0.conv2", "stages.0.0.bn2"):
        plan["slices"][name]["out"] = list(range(len(plan["slices"][name]["out"])))
    if plan["slices"]["stages.0.0.conv2"]["out"] == plan["slices"]["stem.0"]["out"]:
        pytest.skip("the random gates happen to keep the first channels")
    _refused(_resnet, plan, r"inconsistent plan: node add adds channels")


def test_head_reading_other_pooled_channels_is_refused() -> None:
    plan = _resnet_plan()
    keep = plan["slices"]["fc"]["in"]
    plan["slices"]["fc"]["in"] = [i for i in range(16) if i not in keep][: len(keep)]
    _refused(_resnet, plan, r"module 'fc' \(slice 'linear'\) keeps input channels")


def test_bn_slice_with_input_channels_is_refused() -> None:
    # before: the 'in' of a BatchNorm slice was silently ignored
    plan = _resnet_plan()
    plan["slices"]["stem.1"]["in"] = [0]
    _refused(_resnet, plan, r"slice 'stem.1' is a 'bn' slice")


def test_depthwise_kind_on_a_regular_conv_is_refused() -> None:
    # before: sliced as depthwise: a grouped convolution, another function
    plan = _resnet_plan()
    plan["slices"]["stages.0.0.conv1"]["kind"] = "dw"
    _refused(_resnet, plan, r"'stages.0.0.conv1' as 'dw', expected for a depthwise one")


def test_conv_kind_on_a_grouped_conv_is_refused() -> None:
    net = nn.Sequential(nn.Conv1d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv1d(8, 2, 1))
    plan = {
        "format": PLAN_FORMAT, "opaque": {}, "cut": {}, "scopes": [],
        "slices": {"0": {"kind": "conv", "in": None, "out": [0, 1]}},
    }  # fmt: skip
    _refused(lambda: copy.deepcopy(net), plan, r"'0' as 'conv', expected .* groups=1.*groups=2")


# ------------------------------------------------------------------ duplicates and keys
def test_one_module_under_two_names_is_refused() -> None:
    # before: the module was sliced twice (a crash, or a narrower layer than planned)
    model = _Aliased()
    gate_(model, X_MLP)
    random_gates(model, torch.Generator().manual_seed(1))
    plan = json.loads(json.dumps(export_plan(model.eval())))
    plan["slices"]["alias"] = copy.deepcopy(plan["slices"]["body.2"])
    _refused(_Aliased, plan, r"module 'alias' \(slices\), which 'body.2' \(slices\) already")


def test_slice_inside_a_pruned_transformer_layer_is_refused() -> None:
    # before: the slice went to the old layer's Linear, which the rebuilt layer replaces
    def factory() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True))

    plan = {
        "format": PLAN_FORMAT, "opaque": {}, "cut": {}, "scopes": [],
        "transformers": {"0": {"heads": [0], "units": list(range(8)), "attn": True,
                               "ffn": True}},
        "slices": {"0.linear1": {"kind": "linear", "in": None, "out": [0, 1]}},
    }  # fmt: skip
    _refused(factory, plan, r"module '0.linear1' \(slices\), which '0' \(transformers")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda p: p.update(slice={}), r"the plan has unknown keys \['slice'\]"),
        (lambda p: p["slices"]["2"].update(outs=[0]), r"slice '2' has unknown keys \['outs'\]"),
        (lambda p: p["slices"]["2"].update(out="0,1"), r"slice '2' 'out' must be"),
        (lambda p: p["slices"]["2"].update(out=[True, 2]), r"slice '2' 'out' must be"),
        (lambda p: p["slices"]["2"].update(out=[2, 1]), r"strictly increasing"),
        (lambda p: p["slices"]["2"].update(out=[1, 1]), r"strictly increasing"),
        (lambda p: p["slices"]["2"].update(out=[-1, 1]), r"slice '2' 'out' must be"),
        (lambda p: p["slices"]["2"].update(out=[0, 16]), r"output channel 16 of module '2'"),
        (lambda p: p["slices"]["2"].update(n_out=True), r"'n_out' must be an int"),
        (lambda p: p["slices"]["2"].update(n_out=32), r"expects module '2' to have 32 output"),
        (lambda p: p["slices"].update(nope=p["slices"]["2"]), r"module 'nope', which the model"),
        (lambda p: p["opaque"].update({"2": 3}), r"'opaque' reasons must be strings, got 3"),
        (lambda p: p.update(scopes=[3]), r"'scopes' must be strings, got 3"),
    ],
)
def test_malformed_mlp_plans_are_refused(edit: Callable[[Plan], Any], match: str) -> None:
    plan = _mlp_plan()
    edit(plan)
    _refused(_mlp, plan, match)


def _edge(p: Plan) -> dict[str, Any]:
    e: dict[str, Any] = p["edges"][0]
    return e


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        # a block both removed (cut) and kept: before, an unclear crash mid-rewrite
        (lambda p: p["erase"].append(next(iter(p["cut"]))), r"in both 'cut' and 'erase'"),
        (lambda p: p["bypass"].append(p["erase"][0]), r"in both 'erase' and 'bypass'"),
        # before: argument 2 of the add was taken as argument -1, i.e. 1: silently the wrong
        # branch removed
        (lambda p: p["cut"].update({k: 2 for k in p["cut"]}), r"cut 'add_1' must be .* got 2"),
        (lambda p: p["cut"].update({k: True for k in p["cut"]}), r"got True"),
        (lambda p: p["cut"].update(stages_0_0_conv1=0), r"cuts argument 0 of node 'stages_0_0"),
        # before: the node check ran after the slices were applied (model changed)
        (lambda p: p["erase"].append("no_such_node"), r"graph node 'no_such_node' \(erase\)"),
        # before: without its scope the block was silently kept (cut ignored)
        (
            lambda p: p.update(scopes=[], edges=[]),
            r"'add_1' \(cut\) in module 'stages.0.1', which no",
        ),
        # before: the identity branch was removed instead, then erasing failed mid-rewrite
        (lambda p: p["cut"].update({k: 1 for k in p["cut"]}), r"erases node .* still use"),
        (lambda p: p["erase"].remove("stages_0_1_conv1"), r"\['stages_0_1_conv1'\] in 'stages'"),
        (lambda p: p.update(scopes=["stages", "stages.0"]), r"'stages.0' and 'stages'"),
        (lambda p: p.update(scopes=["stages", "nope"]), r"rewrites module 'nope', which the mod"),
        (lambda p: p["edges"].append(dict(_edge(p))), r"a 'buffer' that is a Python identifier"),
        (lambda p: _edge(p).update(buffer="a.b"), r"a 'buffer' that is a Python identifier"),
        (lambda p: _edge(p).update(users=[]), r"needs a non-empty 'users' list"),
        (lambda p: _edge(p).update(scope="stem"), r"in scope 'stem', which no entry of 'scopes'"),
        (lambda p: _edge(p).update(src=p["erase"][0]), r"\(src\), which 'erase' removes"),
        (lambda p: _edge(p).update(weight=1.0), r"unknown keys \['weight'\]"),
        (lambda p: _edge(p).update(users=[1]), r"'users' must be strings, got 1"),
    ],
)
def test_malformed_resnet_plans_are_refused(edit: Callable[[Plan], Any], match: str) -> None:
    plan = _resnet_plan()
    edit(plan)
    _refused(_resnet, plan, match)


def test_plan_of_another_architecture_leaves_the_model_intact() -> None:
    # a third block in the second stage: every module the plan names exists and fits, but the
    # extra block reads the pruned channels unsliced. Before: applied (the forward then
    # failed with a shape error)
    def other() -> nn.Module:
        torch.manual_seed(0)
        return ResNet1d(widths=(8, 16), blocks=(2, 3))

    # an exported plan names the model it came from (since 2026-12-07): refused by that
    plan = _resnet_plan()
    _refused(other, plan, r"exported from another model \(module #35: plan 'pool'")
    # written by hand (no fingerprint): refused by the channel check
    hand = {k: v for k, v in plan.items() if k != "model"}
    _refused(other, hand, r"module 'stages.1.2.conv1' \(not sliced\) keeps input")


def test_unknown_keys_of_recurrent_and_transformer_entries_are_refused() -> None:
    rnn_plan = {
        "format": PLAN_FORMAT, "opaque": {}, "cut": {}, "scopes": [], "slices": {},
        "rnn": {"0": {"units": [[0, 2]], "in": None, "hidden": [0]}},
    }  # fmt: skip
    _refused(lambda: nn.Sequential(nn.LSTM(3, 4)), rnn_plan, r"rnn entry '0' has unknown keys")
    tr_plan = {
        "format": PLAN_FORMAT, "opaque": {}, "cut": {}, "scopes": [], "slices": {},
        "transformers": {"0": {"heads": [0], "units": [0], "attn": True, "ffn": True,
                               "norm": False}},
    }  # fmt: skip
    _refused(
        lambda: nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16)),
        tr_plan,
        r"transformers entry '0' has unknown keys \['norm'\]",
    )


# ------------------------------------------------------------------ random corruptions
def _corrupt(plan: Plan, data: st.DataObject) -> None:
    """One random edit of one entry: another kept-channel list, a deleted entry, another
    width, another cut argument, a dropped scope, an erased node more or less."""
    names = sorted(plan["slices"])
    choice = data.draw(st.sampled_from(["keep", "delete", "width", "cut", "scopes", "erase"]))
    if choice in ("cut", "scopes", "erase") and not plan["cut"]:
        choice = "keep"
    if choice == "keep":
        name = data.draw(st.sampled_from(names))
        spec = plan["slices"][name]
        side = data.draw(st.sampled_from(["in", "out"] if spec["kind"] != "bn" else ["out"]))
        n = spec[f"n_{side}"] or 16
        new = data.draw(st.lists(st.integers(0, n - 1), min_size=1, unique=True).map(sorted))
        hypothesis.assume(new != spec[side])
        spec[side] = new
    elif choice == "delete":
        del plan["slices"][data.draw(st.sampled_from(names))]
    elif choice == "width":
        spec = plan["slices"][data.draw(st.sampled_from(names))]
        side = "n_out" if spec["n_out"] is not None else "n_in"
        spec[side] = data.draw(st.integers(1, 40).filter(lambda v: v != spec[side]))
    elif choice == "cut":
        plan["cut"] = {k: 1 - v for k, v in plan["cut"].items()}
    elif choice == "scopes":
        plan["scopes"] = []
    else:
        plan["erase"] = plan["erase"][:-1]


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
@settings(max_examples=examples(40), deadline=None)
@given(data=st.data())
def test_random_corruptions_apply_to_the_same_model_or_are_refused(
    kind: str, data: st.DataObject
) -> None:
    """A corrupted plan is refused with the model intact, or it rebuilds the correctly
    pruned model (same weights load, same output): never silently another model."""
    factory, case = (_mlp, _mlp_case()) if kind == "mlp" else (_resnet, _resnet_case())
    plan = copy.deepcopy(case[0])
    _corrupt(plan, data)
    model = factory()
    state, structure, _ = _snapshot(model)
    try:
        result = apply_plan(model, plan)
    except (ValueError, TypeError):
        assert [(n, type(m)) for n, m in model.named_modules()] == structure
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k
        return
    _matches_reference(result, case)


class _GQA(nn.Module):
    """Grouped-query attention: 4 query heads of 4 and 2 key/value heads; heads split and
    merged with literal sizes (``view(b, t, 4, 4)``, ``reshape(b, t, 16)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(8, 16), nn.Linear(16, 8)
        self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 4).transpose(1, 2)  # (B, 4, T, 4)
        k = self.k(x).view(b, t, 2, 4).transpose(1, 2).repeat_interleave(2, dim=1)  # (B, 4, T, 4)
        v = self.v(x).view(b, t, 2, 4).transpose(1, 2).repeat_interleave(2, dim=1)  # (B, 4, T, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # (B, 4, T, 4)
        return x + self.o(y.transpose(1, 2).reshape(b, t, 16))  # (B, T, 8)


def _gqa_plan() -> Plan:
    """The plan closing key/value head 0 (query heads 0 and 1), checksum and model removed
    as for a plan written by hand."""
    torch.manual_seed(0)
    model = _GQA()
    summary = gate_(model, torch.randn(2, 5, 8))
    assert summary.head_groups == [0], str(summary)
    inserted_gating(model).group_gates[0].force_(torch.tensor([False, True]))  # type: ignore[operator]
    plan = json.loads(json.dumps(export_plan(model.eval())))
    assert plan["slices"]["q"]["out"] == list(range(8, 16))
    del plan["checksum"], plan["model"]
    return cast(Plan, plan)


def _drop_last_q_row(plan: Plan) -> None:
    plan["slices"]["q"]["out"] = plan["slices"]["q"]["out"][:-1]


def _shift_q_rows(plan: Plan) -> None:
    plan["slices"]["q"]["out"] = [7, *range(9, 16)]  # 8 rows, one from another head


def _drop_last_o_column(plan: Plan) -> None:
    plan["slices"]["o"]["in"] = plan["slices"]["o"]["in"][:-1]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_drop_last_q_row, r"keeps 7 output features of 'q', but node 'view' splits them into "),
        (_shift_q_rows, r"keeps 1 of the 4 features of head 1 of 'q'.*whole heads of 4"),
        (_drop_last_o_column, r"keeps 7 input features of 'o', but node 'reshape' reshapes"),
    ],
)
def test_a_hand_plan_keeping_part_of_a_head_is_refused(
    edit: Callable[[Plan], None], match: str
) -> None:
    # before 2026-12-07 apply_plan accepted it; the first forward failed with fx's shape
    # error (7 rows), or the model mixed two heads (8 rows, one from another head)
    plan = _gqa_plan()
    x = torch.randn(2, 5, 8)
    torch.manual_seed(0)
    pruned = apply_plan(_GQA(), copy.deepcopy(plan))  # the unedited plan applies
    with torch.no_grad():
        assert pruned(x).shape == (2, 5, 8)
    edit(plan)
    torch.manual_seed(0)
    model = _GQA()
    with pytest.raises(ValueError, match=match):
        apply_plan(model, plan)
    assert (model.q.out_features, model.o.in_features) == (16, 16)  # left as it was
