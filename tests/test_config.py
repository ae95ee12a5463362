"""The typed config: YAML + overrides, strict validation with key and file in errors."""
import re

import pytest

from radis.config import ConfigError, SourceConfig, dump_config, load_config


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.lr=1e-4", "data.max_tokens=512", "loss.method=vanilla", "model.dtype=float32"])
    assert cfg.train.lr == 1e-4 and cfg.data.max_tokens == 512
    assert cfg.loss.method == "vanilla" and cfg.model.dtype == "float32"


def test_yaml_sections_and_source_lists(tmp_path):
    path = write(
        tmp_path,
        """
model: {name_or_path: smollm2}
data:
  max_tokens: 1024
  train:
    - {path: a.jsonl, src_lang: de, tgt_lang: en, directions: [de-en, en-de]}
    - {path: b.de, target_path: b.en, format: text}
train: {lr: 3e-5, zero_stage: 2}
""",
    )
    cfg = load_config(path)
    assert cfg.data.max_tokens == 1024 and cfg.train.zero_stage == 2
    assert cfg.train.lr == pytest.approx(3e-5)  # "3e-5" is a YAML string; read as a number
    assert isinstance(cfg.data.train[0], SourceConfig)
    assert cfg.data.train[0].directions == ["de-en", "en-de"]
    assert cfg.data.train[1].target_path == "b.en"
    assert cfg.source_file == str(path)
    # round trip through YAML
    again = write(tmp_path, dump_config(cfg))
    assert load_config(again).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "text, needle",
    [
        ("trian: {lr: 1}", "unknown key 'trian'"),
        ("train: {lrr: 1}", "unknown key 'train.lrr'"),
        ("train: {lr: fast}", "train.lr: expected a number"),
        ("train: {epochs: 1.5}", "train.epochs: expected an integer"),
        ("train: {zero_stage: 4}", "train.zero_stage: expected one of [0, 1, 2, 3]"),
        ("loss: {mode: mean}", "loss.mode: expected one of"),
        ("model: {gradient_checkpointing: 'yes'}", "model.gradient_checkpointing: expected true/false"),
        ("data: {train: {path: x}}", "data.train: expected a list"),
        ("data: {train: [{path: x, lang: de}]}", "unknown key 'data.train[0].lang'"),
        ("- a\n- b", "expected a mapping of sections"),
        ("train: [", "invalid YAML"),
    ],
)
def test_bad_values_name_key_and_file(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.nope=1", "unknown key 'train.nope'"),
        ("nope.lr=1", "unknown key 'nope'"),
        ("train.lr", "expected key=value"),
        ("train.epochs=two", "train.epochs: expected an integer"),
    ],
)
def test_bad_overrides(override, needle):
    with pytest.raises(ConfigError, match="<override>") as err:
        load_config(None, [override])
    assert needle in str(err.value)


def test_a_section_override_merges_into_the_yaml_section(tmp_path):
    path = write(tmp_path, "train: {lr: 3e-5, max_steps: 100, output_dir: outputs/mine, zero_stage: 2}\n")
    cfg = load_config(path, ["train={save_every: 10, max_steps: 50}"])
    assert cfg.train.save_every == 10 and cfg.train.max_steps == 50  # the override's keys
    assert cfg.train.lr == pytest.approx(3e-5)  # the section's other keys keep their YAML values
    assert cfg.train.output_dir == "outputs/mine" and cfg.train.zero_stage == 2
    # each merged key is validated as usual, and an unknown one is still an error
    with pytest.raises(ConfigError, match=re.escape("<override>: train.save_every: expected an integer")):
        load_config(path, ["train={save_every: ten}"])
    with pytest.raises(ConfigError, match=re.escape("<override>: unknown key 'train.nope'")):
        load_config(path, ["train={lr: 1e-5, nope: 1}"])
    with pytest.raises(ConfigError, match=re.escape("train.lr: expected > 0")):  # ranges too
        load_config(path, ["train={lr: 0}"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_wrong_type_for_an_optional_field_is_a_config_error(tmp_path):
    """`X | None` fields (train.max_steps, a source's limit) and unions name the key and
    what was expected; they used to end in "TypeError: exceptions must derive from BaseException"."""
    with pytest.raises(ConfigError, match=r"<override>: train.max_steps: expected an integer, got 'two'"):
        load_config(None, ["train.max_steps=two"])
    path = write(tmp_path, "data:\n  train:\n    - {path: a.jsonl, limit: eight}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: data.train\[0\].limit: expected an integer, got 'eight'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"eval.cut_at_separator: 'sometimes' matches none of: expected true/false"):
        load_config(None, ["eval.cut_at_separator=sometimes"])


def _every_field():
    """(dotted key, a value of the wrong type for it) for every field of every section
    (free-text `str` fields have no wrong value and are left out)."""
    import dataclasses
    import typing

    from radis.config import RadisConfig

    hints_of = typing.get_type_hints
    out = []
    for section in dataclasses.fields(RadisConfig):
        cls = hints_of(RadisConfig)[section.name]
        if not dataclasses.is_dataclass(cls):
            continue
        for f in dataclasses.fields(cls):
            tp = hints_of(cls)[f.name]
            args = typing.get_args(tp)
            flat = {a for a in (args or (tp,)) if a is not type(None)}
            if flat <= {str}:
                continue  # any text is a string
            literals = {v for a in flat if typing.get_origin(a) is typing.Literal for v in typing.get_args(a)}
            if typing.get_origin(tp) is list or any(typing.get_origin(a) is list for a in flat):
                wrong = "{a: 1}"  # a mapping where a list belongs
            elif typing.get_origin(tp) is dict or any(typing.get_origin(a) is dict for a in flat):
                wrong = "[1, 2]"  # a list where a mapping belongs
            elif literals and str in flat:
                continue
            else:
                wrong = "not-a-valid-value-§"
                assert wrong not in literals
            out.append((f"{section.name}.{f.name}", wrong))
    return out


@pytest.mark.parametrize("key,wrong", _every_field(), ids=lambda x: str(x))
def test_every_key_refuses_a_value_of_the_wrong_kind(key, wrong):
    """Every config key, given a value of the wrong kind, is a ConfigError that names the
    key (and never a TypeError or a traceback from deeper down)."""
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [f"{key}={wrong}"])


def _every_source_field():
    import dataclasses
    import typing

    out = []
    for f in dataclasses.fields(SourceConfig):
        tp = typing.get_type_hints(SourceConfig)[f.name]
        flat = {a for a in (typing.get_args(tp) or (tp,)) if a is not type(None)}
        if flat <= {str}:
            continue
        out.append(f.name)
    return out


@pytest.mark.parametrize("name", _every_source_field())
def test_every_source_key_refuses_a_value_of_the_wrong_kind(name, tmp_path):
    """The same for every key of a data source, in a YAML file: the error names the
    file and data.train[0].<key>."""
    path = tmp_path / "run.yaml"
    path.write_text(f"data:\n  train:\n    - {{path: a.jsonl, {name}: [not, valid]}}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"run.yaml: data.train[0].{name}")):
        load_config(path)
