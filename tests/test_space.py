"""Space files: validation errors name the key and the file; conversion keeps bounds and scale."""

from __future__ import annotations

from pathlib import Path

import pytest

from tune_sana.config import UserError
from tune_sana.engine import space

SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"


def _raw(**overrides: object) -> dict[str, object]:
    raw: dict[str, object] = {
        "fixed": {"steps": 10},
        "space": {"lr": {"loguniform": [1e-5, 1e-2]}},
    }
    raw.update(overrides)
    return raw


@pytest.mark.parametrize("path", sorted(SPACES_DIR.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_space_validates_and_opens_with_its_command(path: Path) -> None:
    spec = space.load(path)
    assert spec.space, "a shipped space searches something"
    assert path.read_text().startswith("# tune-sana sweep"), "first line is the command"


def test_default_is_quickstart() -> None:
    assert space.load(None) == space.load(SPACES_DIR / "quickstart.yaml")


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (_raw(serach={}), "unknown key 'serach' (did you mean 'search'?)"),
        (_raw(fixed={"lrr": 1e-3}), "unknown key 'fixed.lrr' (did you mean 'lr'?)"),
        (_raw(space={"lr": {"loguniform": [1e-2, 1e-5]}}), "empty or inverted"),
        (_raw(space={"lr": {"loguniform": [0.0, 1e-2]}}), "needs low > 0"),
        (_raw(space={"lr": {"uniform": [1.0, 1.0]}}), "empty or inverted"),
        (_raw(space={"lr": {"choice": []}}), "at least one value"),
        (_raw(space={"lr": {"logunifrom": [1e-5, 1e-2]}}), "did you mean 'loguniform'"),
        (_raw(space={"precision": {"choice": ["fp32", "fp8"]}}), "space.precision"),
        (_raw(search={"algorithm": "hyperopt"}), "search.algorithm"),
        (_raw(search={"num_sample": 3}), "did you mean 'num_samples'"),
        (_raw(space={"lr": {"grid": [1e-3, 1e-2]}}), "'grid' needs search.algorithm grid"),
        (_raw(fixed={"lr": 1e-3}), "both fixed and searched"),
        (_raw(trial="sana_fintune"), "did you mean 'sana_finetune'"),
        (_raw(fixed={"steps": -1}), "fixed"),
    ],
)
def test_bad_spec_is_one_line_naming_key_and_file(raw: dict[str, object], needle: str) -> None:
    with pytest.raises(UserError) as err:
        space.parse_spec(raw, source="my.yaml")
    message = str(err.value)
    assert needle in message
    assert message.startswith("my.yaml")
    assert "\n" not in message


def test_null_in_choice_and_overrides() -> None:
    raw = _raw(space={"max_grad_norm": {"choice": [None, 1.0]}, "lr": {"loguniform": [1e-5, 1e-2]}})
    raw = space.apply_overrides(raw, {"lr": 3e-4, "search.num_samples": 5})
    spec = space.parse_spec(raw, "x.yaml")
    assert spec.fixed["lr"] == 3e-4 and "lr" not in spec.space
    assert spec.search.num_samples == 5
    assert spec.space["max_grad_norm"].values() == [None, 1.0]


def test_conversions_keep_bounds_scale_and_inclusivity() -> None:
    spec = space.parse_spec(
        _raw(space={
            "lr": {"loguniform": [1e-5, 1e-2]},
            "warmup_steps": {"int": [0, 10]},
            "max_grad_norm": {"choice": [None, 1.0]},
        }),
        "x.yaml",
    )
    ray_space = space.ray_space(spec)
    assert ray_space["lr"].lower == 1e-5 and ray_space["lr"].upper == 1e-2
    assert ray_space["warmup_steps"].upper == 11  # randint's upper is exclusive: 10 is included
    assert ray_space["max_grad_norm"].categories == [None, 1.0]
    dists = space.optuna_space(spec)
    assert dists["lr"].log and dists["lr"].low == 1e-5 and dists["lr"].high == 1e-2
    assert (dists["warmup_steps"].low, dists["warmup_steps"].high) == (0, 10)


def test_malformed_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("space:\n  lr: {loguniform: [1e-5, 1e-2]\n")
    with pytest.raises(UserError, match=r"bad.yaml: malformed YAML at line \d+"):
        space.load(bad)
    with pytest.raises(UserError, match="no such space file"):
        space.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize("algorithm", ["optuna", "random", "grid"])
@pytest.mark.parametrize("trial", ["sana_finetune", "synthetic"])
def test_a_space_with_nothing_to_search_is_an_error(algorithm: str, trial: str) -> None:
    for searched in ({}, None):
        raw = {"trial": trial, "search": {"algorithm": algorithm}, "fixed": {"steps": 10},
               "space": searched}
        with pytest.raises(UserError, match=r"^my.yaml: nothing to search: no key under "
                                            r"space:; add a key under space:"):
            space.parse_spec(raw, source="my.yaml")


def test_nothing_to_search_after_set_names_the_set(tmp_path: Path) -> None:
    file = tmp_path / "one.yaml"
    file.write_text("space: {lr: {loguniform: [1.0e-5, 1.0e-2]}}\n")
    with pytest.raises(UserError) as err:
        space.load(file, {"lr": 1e-3})
    assert str(err.value).startswith(f"{file}: nothing to search: --set lr fixed the only "
                                     "searched key")
    assert "tune-sana trial" in str(err.value)


def test_one_value_is_still_a_search_of_one_configuration() -> None:
    spec = space.parse_spec(_raw(space={"seed": {"grid": [0]}}, search={"algorithm": "grid"}),
                            "x.yaml")
    assert spec.space["seed"].values() == [0]


@pytest.mark.parametrize(
    ("searched", "needle"),
    [
        ({"steps": {"uniform": [100, 200]}},
         "space.steps: uniform draws floats but 'steps' is an integer; use int: [100, 200]"),
        ({"warmup_steps": {"loguniform": [1, 50]}}, "use int: [1, 50], log: true"),
        ({"seed": {"uniform": [0.5, 3.5]}}, "use int: [low, high]"),
        ({"checkpoint_every": {"uniform": [5, 10]}}, "'checkpoint_every' is an integer"),
        ({"precision": {"loguniform": [1, 2]}}, "'precision' is not a number; use choice"),
        ({"attention_fp32": {"int": [0, 1]}}, "is true or false; use choice: [false, true]"),
        ({"model": {"int": [0, 1]}}, "'model' is not a number; use choice"),
        ({"adam_beta2": {"uniform": [0.9, 1.5]}}, "key 'adam_beta2' = 1.5"),
        ({"lora_rank": {"int": [1, 2]}, "adam_beta1": {"int": [0, 1]}},
         "space.adam_beta1: key 'adam_beta1' = 1"),
        ({"attention_fp32": {"choice": [False, 1]}},
         "space.attention_fp32: 1 is not true or false"),
        ({"attention_fp32": {"grid": ["yes"]}}, "'yes' is not true or false"),
        ({"warmup_steps": {"choice": [0, 10.0]}}, "space.warmup_steps: 10.0 is not an integer"),
        ({"batch_size": {"choice": [True]}}, "True is not an integer"),
        ({"lr": {"choice": [1e-3, False]}}, "space.lr: False is not a number"),
        ({"max_grad_norm": {"choice": [None, "1.0"]}}, "'1.0' is not a number"),
    ],
)
def test_every_dimension_is_checked_against_its_keys_type(searched: dict[str, object],
                                                          needle: str) -> None:
    raw = {"fixed": {"steps": 10}, "space": searched,
           "search": {"algorithm": "random"}}
    if "steps" in searched:
        raw["fixed"] = {}
    with pytest.raises(UserError) as err:
        space.parse_spec(raw, source="my.yaml")
    message = str(err.value)
    assert message.startswith("my.yaml: ") and needle in message and "\n" not in message


def test_well_typed_dimensions_pass() -> None:
    spec = space.parse_spec({"fixed": {"steps": 10}, "search": {"algorithm": "random"}, "space": {
        "lr": {"int": [1, 2]},  # int on a float key: fine
        "max_grad_norm": {"choice": [None, 1, 0.5]},
        "attention_fp32": {"choice": [False, True]},
        "warmup_steps": {"int": [0, 5]},
        "seed": {"grid": [0, 1]},
        "precision": {"choice": ["fp32", "bf16-amp"]},
    }}, "x.yaml")
    assert set(spec.space) == {"lr", "max_grad_norm", "attention_fp32", "warmup_steps", "seed",
                               "precision"}


# --- search.confirm and search.points_to_evaluate ------------------------------------------------

def _synthetic(search: dict[str, object], space_: dict[str, object] | None = None
               ) -> dict[str, object]:
    return {"trial": "synthetic", "search": search, "fixed": {"steps": 10},
            "space": space_ or {"lr": {"loguniform": [1e-5, 1e-1]},
                                "nan_from": {"choice": [None, 3]}}}


def test_confirm_is_off_unless_given_and_takes_top_k_and_seeds() -> None:
    assert space.parse_spec(_raw(), "x.yaml").search.confirm is None
    assert space.parse_spec(_raw(search={"confirm": None}), "x.yaml").search.confirm is None
    spec = space.parse_spec(_raw(search={"confirm": {"top_k": 4, "seeds": 3}}), "x.yaml")
    assert spec.search.confirm is not None
    assert (spec.search.confirm.top_k, spec.search.confirm.seeds) == (4, 3)
    assert "confirm" not in space.parse_spec(_raw(), "x.yaml").to_yaml()  # old runs resume
    quickstart = space.load(None).search.confirm
    assert quickstart is not None and (quickstart.top_k, quickstart.seeds) == (3, 2)


@pytest.mark.parametrize(
    ("search", "needle"),
    [
        ({"confirm": {"top_k": 0, "seeds": 2}}, "key 'search.confirm.top_k'"),
        ({"confirm": {"top_k": 3, "seeds": 0}}, "key 'search.confirm.seeds'"),
        ({"confirm": {"topk": 3}}, "unknown key 'search.confirm.topk' (did you mean 'top_k'?); "
                                   "valid here: top_k, seeds"),
        ({"confirm": 3}, "key 'search.confirm'"),
    ],
)
def test_bad_confirm_is_one_line(search: dict[str, object], needle: str) -> None:
    with pytest.raises(UserError) as err:
        space.parse_spec(_raw(search=search), source="my.yaml")
    assert str(err.value).startswith("my.yaml: ") and needle in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (_synthetic({"algorithm": "optuna", "points_to_evaluate": [{"lr": 1e-3}, {"lrr": 1e-3}]}),
         "search.points_to_evaluate[1]: 'lrr' is not a searched key (did you mean 'lr'?); a "
         "point sets keys under space: (lr, nan_from)"),
        (_synthetic({"algorithm": "optuna", "points_to_evaluate": [{"steps": 5}]}),
         "search.points_to_evaluate[0]: 'steps' is fixed, not searched; drop it"),
        (_synthetic({"algorithm": "optuna", "points_to_evaluate": [{"lr": 0.5}]}),
         "search.points_to_evaluate[0].lr: 0.5 is outside space.lr's loguniform range "
         "[1e-05, 0.1]; use a value within it"),
        (_synthetic({"algorithm": "optuna", "points_to_evaluate": [{"lr": "1e-3"}]}),
         "points_to_evaluate[0].lr: '1e-3' is not a number"),
        (_synthetic({"algorithm": "random", "points_to_evaluate": [{"nan_from": 4}]}),
         "points_to_evaluate[0].nan_from: 4 is not one of space.nan_from's values (null, 3); "
         "use one of them"),
        (_synthetic({"algorithm": "random", "points_to_evaluate": [{}]}),
         "search.points_to_evaluate[0]: an empty point"),
        (_synthetic({"algorithm": "random", "num_samples": 1,
                     "points_to_evaluate": [{"lr": 1e-3}, {"lr": 1e-2}]}),
         "2 points but search.num_samples is 1 (the points count inside it); raise num_samples "
         "to at least 2"),
        (_synthetic({"algorithm": "grid", "points_to_evaluate": [{"lr": 1e-3}]},
                    {"lr": {"grid": [1e-3, 1e-2]}}),
         "algorithm grid runs every combination of its grid and takes no points"),
        (_synthetic({"algorithm": "random", "points_to_evaluate": [1e-3]}),
         "key 'search.points_to_evaluate.0'"),
        (_raw(search={"points_to_evaluate": [{"lr": 1e-3, "precision": "fp8"}]},
              space={"lr": {"loguniform": [1e-5, 1e-2]},
                     "precision": {"choice": ["fp32", "bf16-amp"]}}),
         "points_to_evaluate[0].precision: 'fp8' is not one of space.precision's values "
         "(fp32, bf16-amp)"),
        (_raw(search={"algorithm": "random", "points_to_evaluate": [{"warmup_steps": 2.0}]},
              space={"warmup_steps": {"int": [0, 5]}}),
         "points_to_evaluate[0].warmup_steps: 2.0 is not an integer"),
        (_raw(search={"algorithm": "random", "points_to_evaluate": [{"warmup_steps": 6}]},
              space={"warmup_steps": {"int": [0, 5]}}),
         "6 is outside space.warmup_steps's int range [0, 5]"),
        (_raw(search={"points_to_evaluate": [{"attention_fp32": 1}]},
              space={"attention_fp32": {"choice": [False, True]}}),
         "points_to_evaluate[0].attention_fp32: 1 is not true or false"),
    ],
)
def test_bad_point_names_its_index_key_and_fix(raw: dict[str, object], needle: str) -> None:
    with pytest.raises(UserError) as err:
        space.parse_spec(raw, source="my.yaml")
    message = str(err.value)
    assert message.startswith("my.yaml: ") and needle in message and "\n" not in message


def test_points_reach_the_searchers_first_as_the_dimensions_values() -> None:
    from ray.tune.search import BasicVariantGenerator

    from tune_sana.engine.search import build_searcher

    points = [{"lr": 1e-3, "nan_from": 3.0}, {"nan_from": None}]
    spec = space.parse_spec(_synthetic({"algorithm": "optuna", "num_samples": 4,
                                        "points_to_evaluate": points}), "x.yaml")
    resolved = space.starting_points(spec)
    assert resolved == points and type(resolved[0]["nan_from"]) is int  # the choice's own 3
    searcher, _ = build_searcher(spec)
    study = searcher._ot_study  # type: ignore[attr-defined]
    first = searcher.suggest("a")
    second = searcher.suggest("b")
    assert first == {"lr": 1e-3, "nan_from": 3}
    assert second is not None and second["nan_from"] is None  # lr drawn
    assert len(study.trials) == 2

    random_spec = spec.model_copy(update={"search": spec.search.model_copy(
        update={"algorithm": "random"})})
    generator, _ = build_searcher(random_spec)
    assert isinstance(generator, BasicVariantGenerator)
    assert generator._points_to_evaluate == resolved


@pytest.mark.parametrize(
    ("search", "searched", "expected"),
    [
        ({"algorithm": "optuna", "num_samples": 5}, {"lr": {"loguniform": [1e-5, 1e-1]}}, 5),
        ({"algorithm": "grid", "num_samples": 2},
         {"lr": {"grid": [1e-3, 1e-2]}, "seed": {"grid": [0, 1, 2]}}, 12),
        ({"algorithm": "random", "num_samples": 3,
          "points_to_evaluate": [{"seed": 0}, {"lr": 1e-3}]},
         {"lr": {"loguniform": [1e-5, 1e-1]}, "seed": {"grid": [0, 1, 2]}}, 1 + 3 + 3),
    ],
)
def test_search_trials_counts_like_rays_variant_generator(
        search: dict[str, object], searched: dict[str, object], expected: int) -> None:
    raw = {"trial": "synthetic", "search": search, "fixed": {"steps": 10}, "space": searched}
    spec = space.parse_spec(raw, "x.yaml")
    assert space.search_trials(spec) == expected
    if spec.search.algorithm != "optuna":
        from ray.tune.search.variant_generator import _count_variants

        ray_spec = {"config": space.ray_space(spec), "num_samples": spec.search.num_samples}
        assert _count_variants(ray_spec, space.starting_points(spec)) == expected
