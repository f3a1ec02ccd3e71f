"""Which module each adapter tensor goes to: decided as PEFT decides it, or refused.

The target rules are checked against PEFT's own ``check_target_module_exists``
over generated configs; the name rules against what ``PeftModel.from_pretrained``
does with real files in ``tests/integration/test_peft_exact.py``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorapool.errors import AdapterValidationError
from lorapool.formats import (
    LLAMA_PARENTS,
    LoraTargets,
    check_adapter_config,
    map_lora_tensors,
    missing_sites,
    module_key,
    parse_adapter_config,
)

P = "base_model.model.model.layers"
QA0 = f"{P}.0.self_attn.q_proj.lora_A.weight"
QB0 = f"{P}.0.self_attn.q_proj.lora_B.weight"
ATTN = LoraTargets(frozenset({"q_proj", "v_proj"}))


def _config(**fields: object) -> dict[str, object]:
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **fields}


def _targets(**fields: object) -> LoraTargets:
    check = check_adapter_config(json.dumps(_config(**fields)).encode())
    assert not check.problems, [str(p) for p in check.problems]
    assert check.targets is not None
    return check.targets


def _reasons(**fields: object) -> list[str]:
    return [p.reason for p in check_adapter_config(json.dumps(_config(**fields)).encode()).problems]


# -- tensor names ------------------------------------------------------------------------


def test_peft_names_map_to_their_module() -> None:
    names = [QA0, QB0, f"{P}.3.mlp.down_proj.lora_A.default.weight"]
    mapping = map_lora_tensors(names, LoraTargets(None), LLAMA_PARENTS)
    assert mapping.problems == []
    site = mapping.sites[names[2]]
    assert (site.layer, site.parent, site.module, site.side) == (3, "mlp", "down_proj", "A")
    assert site.key == "model.layers.3.mlp.down_proj"


def test_untargeted_tensors_refused_naming_one() -> None:
    gate = f"{P}.0.mlp.gate_proj.lora_A.weight"
    mapping = map_lora_tensors([QA0, QB0, gate], ATTN, LLAMA_PARENTS)
    [problem] = mapping.problems
    assert problem.reason == "untargeted_tensors"
    assert gate in problem.detail and "target_modules" in problem.detail
    assert set(mapping.sites) == {QA0, QB0}
    with pytest.raises(AdapterValidationError) as info:
        mapping.raise_first()
    assert info.value.reason == "untargeted_tensors"


def test_a_weight_under_two_names_is_ambiguous() -> None:
    dup = QA0.replace("lora_A.weight", "lora_A.default.weight")
    mapping = map_lora_tensors([QA0, dup, QB0], ATTN, LLAMA_PARENTS)
    [problem] = mapping.problems
    assert problem.reason == "ambiguous_tensor_names"
    assert QA0 in problem.detail and dup in problem.detail
    assert set(mapping.sites) == {QA0, QB0}  # the one PEFT loads
    # either name alone is what PEFT loads
    for a in (QA0, dup):
        assert map_lora_tensors([a, QB0], ATTN, LLAMA_PARENTS).problems == []


@pytest.mark.parametrize(
    "name",
    [
        QA0.removeprefix("base_model.model."),  # PEFT loads nothing without the prefix
        QA0.removeprefix("base_model.model.model."),
        QA0.replace("lora_A.weight", "lora_A.other.weight"),  # another adapter name
        f"{P}.0.mlp.q_proj.lora_A.weight",  # q_proj is under self_attn
        f"{P}.0.self_attn.qq_proj.lora_A.weight",
        f"{P}.01.self_attn.q_proj.lora_A.weight",  # not a module key
        f"{P}.\u0661.self_attn.q_proj.lora_A.weight",  # a non-ASCII digit
        "lm_head.weight",
    ],
)
def test_names_peft_would_not_load_are_unknown(name: str) -> None:
    mapping = map_lora_tensors([name], LoraTargets(None), LLAMA_PARENTS)
    assert [p.reason for p in mapping.problems] == ["unknown_module"]
    assert mapping.sites == {}


def test_without_a_base_parents_are_not_checked() -> None:
    name = f"{P}.0.mlp.q_proj.lora_A.weight"
    assert map_lora_tensors([name], LoraTargets(None), None).problems == []


QM0 = f"{P}.0.self_attn.q_proj.lora_magnitude_vector"
DORA = LoraTargets(frozenset({"q_proj", "v_proj"}), dora=True)


@pytest.mark.parametrize("suffix", ["", ".weight", ".default.weight"])
def test_dora_magnitude_maps_to_side_m(suffix: str) -> None:
    """The names PEFT loads a DoRA magnitude under (``save_pretrained`` writes the first)."""
    mapping = map_lora_tensors([QA0, QB0, QM0 + suffix], DORA, LLAMA_PARENTS)
    assert mapping.problems == []
    site = mapping.sites[QM0 + suffix]
    assert (site.layer, site.parent, site.module, site.side) == (0, "self_attn", "q_proj", "M")
    assert {s.side for s in mapping.sites.values()} == {"A", "B", "M"}


def test_magnitude_without_dora_refused() -> None:
    mapping = map_lora_tensors([QA0, QB0, QM0], ATTN, LLAMA_PARENTS)
    [problem] = mapping.problems
    assert problem.reason == "magnitude_without_dora"
    assert QM0 in problem.detail and "use_dora" in problem.detail
    assert set(mapping.sites) == {QA0, QB0}


def test_dora_modules_need_their_magnitude_and_the_reverse() -> None:
    [problem] = map_lora_tensors([QA0, QB0], DORA, LLAMA_PARENTS).problems
    assert problem.reason == "unpaired_magnitude"
    assert "layer 0 q_proj" in problem.detail and "no lora_magnitude_vector" in problem.detail
    [problem] = map_lora_tensors([QM0], DORA, LLAMA_PARENTS).problems
    assert problem.reason == "unpaired_magnitude" and "no lora_A/lora_B" in problem.detail
    # an A without B is still a DoRA module with its magnitude: unpaired_lora is the caller's
    assert map_lora_tensors([QA0, QM0], DORA, LLAMA_PARENTS).problems == []


def test_a_magnitude_under_two_names_is_ambiguous() -> None:
    dup = f"{QM0}.default.weight"
    mapping = map_lora_tensors([QA0, QB0, QM0, dup], DORA, LLAMA_PARENTS)
    [problem] = mapping.problems
    assert problem.reason == "ambiguous_tensor_names"
    assert QM0 in problem.detail and dup in problem.detail
    assert len([s for s in mapping.sites.values() if s.side == "M"]) == 1


@pytest.mark.parametrize(
    "name",
    [
        f"{QM0}.default",  # PEFT ignores it (found with peft 0.21)
        f"{QM0}.other.weight",
        f"{QM0}.weight.weight",
        QM0.removeprefix("base_model.model."),
        f"{P}.0.self_attn.q_proj.lora_magnitude",
    ],
)
def test_magnitude_names_peft_would_not_load_are_unknown(name: str) -> None:
    mapping = map_lora_tensors([QA0, QB0, name], DORA, LLAMA_PARENTS)
    assert [p.reason for p in mapping.problems] == ["unknown_module", "unpaired_magnitude"]
    assert name not in mapping.sites


def test_dora_config_targets() -> None:
    assert _targets(use_dora=True).dora
    assert not _targets().dora
    assert LoraTargets.from_config(parse_adapter_config(json.dumps(_config(use_dora=True)))).dora


def test_missing_sites() -> None:
    targets = LoraTargets(frozenset({"q_proj"}), layers=frozenset({0, 2}))
    present = [(0, "q_proj")]
    assert missing_sites(present, targets, LLAMA_PARENTS, 4) == [(2, "q_proj")]
    assert missing_sites([(0, "q_proj"), (2, "q_proj")], targets, LLAMA_PARENTS, 4) == []


# -- the config's targets ----------------------------------------------------------------


def test_targets_from_the_config() -> None:
    assert _targets(target_modules="all-linear").modules is None
    assert _targets(target_modules="ALL-LINEAR").modules is None
    targets = _targets(
        target_modules=["q_proj", "mlp.up_proj"],
        layers_to_transform=1,
        layers_pattern="layers",
        exclude_modules=["model.layers.1.self_attn.q_proj"],
    )
    assert not targets.wraps("model.layers.1.self_attn.q_proj")
    assert targets.wraps("model.layers.1.mlp.up_proj")
    assert not targets.wraps("model.layers.0.mlp.up_proj")
    assert parse_adapter_config(
        json.dumps(_config(target_modules="all-linear"))
    ).target_modules == ("all-linear",)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"target_modules": "q_proj"}, "bad_config"),  # a regex to PEFT: matches no module
        ({"target_modules": r".*\.(q|v)_proj"}, "bad_config"),
        ({"target_modules": ["all-linear"]}, "bad_config"),  # a module name to PEFT
        ({"target_modules": "all-linear", "layers_to_transform": [0]}, "bad_config"),
        ({"layers_pattern": "layers"}, "bad_config"),  # PEFT needs layers_to_transform too
        ({"layers_to_transform": "0"}, "bad_config"),
        ({"layers_to_transform": [0], "layers_pattern": r"layers?"}, "unsupported_option"),
        ({"exclude_modules": ".*q_proj"}, "unsupported_option"),
        ({"exclude_modules": {"q_proj": 1}}, "bad_config"),
        ({"init_lora_weights": "pissa"}, "unsupported_option"),
        ({"init_lora_weights": "pissa_niter_4"}, "unsupported_option"),
        ({"init_lora_weights": "olora"}, "unsupported_option"),
        ({"init_lora_weights": "corda"}, "unsupported_option"),
        ({"init_lora_weights": "loftq"}, "unsupported_option"),
        ({"init_lora_weights": "mica"}, "unsupported_option"),
        ({"init_lora_weights": 1}, "unsupported_option"),
        ({"alora_invocation_tokens": [1, 2]}, "unsupported_option"),
        ({"use_bdlora": {"nblocks": 2}}, "unsupported_option"),
        ({"target_parameters": ["mlp.experts.down_proj"]}, "unsupported_option"),
    ],
)
def test_configs_peft_would_not_serve_as_plain_lora(fields: dict[str, object], reason: str) -> None:
    assert reason in _reasons(**fields)


@pytest.mark.parametrize("init", [True, False, None, "gaussian", "eva", "orthogonal", "lora_ga"])
def test_inits_that_leave_the_base_alone(init: object) -> None:
    assert _reasons(init_lora_weights=init) == []


KEYS = [
    module_key(layer, parent, module)
    for layer in range(3)
    for module, parent in LLAMA_PARENTS.items()
]
TARGET_NAMES = st.sampled_from(
    [
        "q_proj",
        "v_proj",
        "up_proj",
        "proj",
        "self_attn.q_proj",
        "mlp.down_proj",
        "layers.1.mlp.gate_proj",
        "model.layers.2.self_attn.o_proj",
        "model.layers.0.self_attn.k_proj",
        "self_attn",
    ]
)
PEFT_CONFIGS = st.fixed_dictionaries(
    {"target_modules": st.lists(TARGET_NAMES, min_size=1, max_size=4, unique=True)},
    optional={
        "layers_to_transform": st.integers(0, 3) | st.lists(st.integers(0, 3), max_size=3),
        "layers_pattern": st.sampled_from(["layers", "h", ["layers"], ["h", "layers"], []]),
        "exclude_modules": st.lists(TARGET_NAMES, max_size=2),
    },
)


@settings(max_examples=300, deadline=None)
@given(PEFT_CONFIGS)
def test_targets_match_peft(fields: dict[str, Any]) -> None:
    """``LoraTargets.wraps`` agrees with PEFT's ``check_target_module_exists`` on every key."""
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists

    try:
        peft_config = peft.LoraConfig(**fields)
    except ValueError:
        assert _reasons(**fields), f"PEFT refuses {fields}, lorapool accepts it"
        return
    targets = _targets(**fields)
    for key in KEYS:
        # an excluded module comes back as a falsy marker
        expected = bool(check_target_module_exists(peft_config, key))
        assert targets.wraps(key) == expected, (key, fields)
