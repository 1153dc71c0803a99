import json
import math

import pytest

from lorakit import LoraConfig


def test_scaling_is_alpha_over_r_or_sqrt_r():
    assert LoraConfig(r=8, alpha=16).scaling == 2.0
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scaling == 8 / math.sqrt(16)


def test_lists_are_normalised_to_tuples_and_regex_stays_a_string():
    cfg = LoraConfig(target_modules=["query", "value"], modules_to_save=["classifier"])
    assert cfg.target_modules == ("query", "value") and cfg.modules_to_save == ("classifier",)
    assert LoraConfig(target_modules=r".*\.(query|value)").target_modules == r".*\.(query|value)"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), r"r must be a positive integer, got r=0"),
        (dict(r=-2), r"r must be a positive integer, got r=-2"),
        (dict(r=2.5), r"r must be a positive integer, got r=2.5"),
        (dict(alpha=0), r"alpha must be a finite positive number, got alpha=0"),
        (dict(alpha=-1.0), r"alpha must be a finite positive number, got alpha=-1.0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got dropout=1.0"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\), got dropout=-0.1"),
        (dict(bias="some"), r"bias must be 'none', 'all' or 'lora_only', got bias='some'"),
        (dict(init="xavier"), r"init must be 'kaiming', 'gaussian' or 'random', got init='xavier'"),
        (dict(target_modules=[]), r"target_modules must not be empty"),
        (dict(enable_lora={"c_attn": [False, False]}), r"enable_lora\['c_attn'\] must be a non-empty sequence"),
    ],
)
def test_bad_values_raise_value_error_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="target_modules must hold non-empty strings"):
        LoraConfig(target_modules=["query", 3])
    with pytest.raises(TypeError, match="modules_to_save must be a list of module names"):
        LoraConfig(modules_to_save="classifier")


def test_peft_dict_round_trip():
    cfg = LoraConfig(r=4, alpha=32, target_modules=("q", "v"), dropout=0.1, bias="lora_only",
                     init="gaussian", use_rslora=True, modules_to_save=("classifier",),
                     enable_lora={"c_attn": (True, False, True)})
    d = json.loads(cfg.to_json())
    assert d["peft_type"] == "LORA" and d["lora_alpha"] == 32 and d["init_lora_weights"] == "gaussian"
    assert LoraConfig.from_peft_dict(d) == cfg


def test_from_peft_dict_refuses_missing_fields_and_unsupported_options():
    d = json.loads(LoraConfig(target_modules=("q",)).to_json())
    for field in ("r", "lora_alpha", "target_modules", "peft_type"):
        broken = {k: v for k, v in d.items() if k != field}
        with pytest.raises(ValueError, match=rf"missing required field\(s\) \['{field}'\]"):
            LoraConfig.from_peft_dict(broken)
    with pytest.raises(ValueError, match="peft_type='IA3'; lorakit reads only 'LORA'"):
        LoraConfig.from_peft_dict({**d, "peft_type": "IA3"})
    with pytest.raises(ValueError, match="sets lora_bias=True, which lorakit does not support"):
        LoraConfig.from_peft_dict({**d, "lora_bias": True})
    with pytest.raises(ValueError, match="sets layers_to_transform"):
        LoraConfig.from_peft_dict({**d, "layers_to_transform": [0, 1]})


def test_every_peft_key_is_honoured_or_refused_by_name():
    peft = pytest.importorskip("peft")
    d = json.loads(LoraConfig(target_modules=("q",)).to_json())
    # PEFT's own config file, all keys at their defaults, loads
    theirs = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q"]).to_dict()
    theirs["peft_type"], theirs["task_type"] = "LORA", None
    theirs = json.loads(json.dumps(theirs, default=str))
    assert LoraConfig.from_peft_dict(theirs).r == 4
    with pytest.raises(ValueError, match=r"sets alora_invocation_tokens=\[1, 2\], which lorakit does not support"):
        LoraConfig.from_peft_dict({**d, "alora_invocation_tokens": [1, 2]})
    with pytest.raises(ValueError, match=r"sets exclude_modules=\['k'\], which lorakit does not support"):
        LoraConfig.from_peft_dict({**d, "exclude_modules": ["k"]})
    with pytest.raises(ValueError, match=r"has key\(s\) \['lora_future_option'\] that lorakit does not know"):
        LoraConfig.from_peft_dict({**d, "lora_future_option": 3})


def test_peft_names_and_peft_configs_are_accepted():
    ours = LoraConfig(r=8, alpha=16, dropout=0.1, init="gaussian", target_modules=("q", "v"))
    assert LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, init_lora_weights="gaussian", target_modules=["q", "v"]) == ours
    with pytest.raises(ValueError, match=r"give alpha or PEFT's lora_alpha, not both \(4 vs 16\)"):
        LoraConfig(alpha=4, lora_alpha=16)
    with pytest.raises(ValueError, match="init_lora_weights='pissa'; lorakit supports true, false"):
        LoraConfig(init_lora_weights="pissa")
    peft = pytest.importorskip("peft")
    theirs = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, init_lora_weights="gaussian", target_modules=["q", "v"])
    assert LoraConfig.coerce(theirs) == ours
    assert LoraConfig.coerce({"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "init_lora_weights": "gaussian",
                              "target_modules": ["q", "v"]}) == ours
    with pytest.raises(ValueError, match="the PEFT config sets lora_bias=True, which lorakit does not support"):
        LoraConfig.coerce(peft.LoraConfig(lora_bias=True))
    assert LoraConfig.coerce(peft.LoraConfig(use_dora=True, rank_pattern={"q": 2})).use_dora


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=math.inf), r"alpha must be a finite positive number, got alpha=inf"),
    (dict(lora_alpha=math.inf), r"alpha must be a finite positive number, got alpha=inf"),
    (dict(alpha=math.nan), r"alpha must be a finite positive number, got alpha=nan"),
    (dict(dropout=math.nan), r"dropout must be in \[0, 1\), got dropout=nan"),
    (dict(dropout=math.inf), r"dropout must be in \[0, 1\), got dropout=inf"),
    (dict(r=math.inf), r"r must be a positive integer, got r=inf"),
])
def test_non_finite_numbers_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("key, text", [("lora_alpha", "Infinity"), ("lora_alpha", "NaN"), ("lora_dropout", "NaN"),
                                       ("r", "-Infinity")])
def test_adapter_files_with_non_finite_numbers_are_refused_by_key(tmp_path, key, text):
    d = json.loads(LoraConfig(target_modules=("q",)).to_json())
    (tmp_path / "adapter_config.json").write_text(json.dumps(d).replace(f'"{key}": {d[key]}', f'"{key}": {text}'))
    with pytest.raises(ValueError, match=rf"adapter_config.json sets {key}=-?(inf|nan); every number of a LoRA "
                                         "config must be finite"):
        LoraConfig.load(tmp_path)


def test_peft_only_keywords_are_accepted_off_and_refused_by_name_otherwise():
    assert LoraConfig(r=4, layer_replication=None, layers_to_transform=None, lora_bias=False) == LoraConfig(r=4)
    for kwargs, shown in [(dict(trainable_token_indices=[3]), r"trainable_token_indices=\[3\]"),
                          (dict(loftq_config={"loftq_bits": 4}), "loftq_config"),
                          (dict(layers_to_transform=[0]), r"layers_to_transform=\[0\]"),
                          (dict(lora_bias=True), "lora_bias=True"), (dict(target_parameters=["w"]), "target_parameters")]:
        with pytest.raises(ValueError, match=rf"LoraConfig\(...\) sets {shown}.*which lorakit does not support"):
            LoraConfig(**kwargs)
    # the same refusal as for files
    d = json.loads(LoraConfig(target_modules=("q",)).to_json())
    with pytest.raises(ValueError, match=r"sets lora_bias=True, which lorakit does not support \(only PEFT's off value"):
        LoraConfig.from_peft_dict({**d, "lora_bias": True})


def test_unknown_keywords_are_a_type_error_naming_them_with_a_hint():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['lora_alhpa'\] \(did you mean 'lora_alpha'"):
        LoraConfig(lora_alhpa=16)
    with pytest.raises(TypeError, match=r"\['peft_version'\] \(peft_version is a PEFT setting LoraConfig does not "
                                        "take: leave it out"):
        LoraConfig(peft_version="0.21")
    # PEFT's snippets pass inference_mode (whether PEFT freezes the factors): accepted, no effect on outputs
    assert LoraConfig(r=4, inference_mode=False) == LoraConfig(r=4)
    with pytest.raises(TypeError, match=r"\[.zzz.\]; it takes alpha, alpha_pattern, base_model_name_or_path, bias"):
        LoraConfig(zzz=1)


def test_init_lora_weights_false_gives_a_random_b_as_peft_from_python_and_from_files(tmp_path):
    """PEFT's init_lora_weights=False: B is not zero (nn.Linear's default init, U(-1/sqrt(r), 1/sqrt(r))), the
    same from LoraConfig(...), a PEFT config dict and a file; written back as false."""
    import json

    import torch
    from torch import nn

    import lorakit

    for config in (LoraConfig(r=4, target_modules=["0"], init_lora_weights=False),
                   {"r": 4, "target_modules": ["0"], "init_lora_weights": False},
                   LoraConfig.from_peft_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["0"],
                                              "init_lora_weights": False})):
        model = lorakit.add_lora(nn.Sequential(nn.Linear(16, 32), nn.Embedding(10, 8)), config)
        B = model[0].lora_B["default"]
        assert B.abs().max() > 0 and B.abs().max() <= 4 ** -0.5
        x = torch.randn(3, 16)
        with lorakit.disable_adapters(model):
            base = model[0](x)
        assert not torch.allclose(model[0](x), base)  # a fresh adapter changes the output, as in PEFT
        assert lorakit.adapter_config(model, "default").to_peft_dict()["init_lora_weights"] is False
    emb = lorakit.add_lora(nn.Sequential(nn.Embedding(10, 8)), LoraConfig(r=2, target_modules=["0"], init="random"))
    assert emb[0].lora_A["default"].abs().sum() > 0 and emb[0].lora_B["default"].abs().sum() > 0  # PEFT: both randn
    lorakit.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] is False
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa'; lorakit supports true, false"):
        LoraConfig(init_lora_weights="pissa")


def test_dora_and_rank_alpha_patterns_are_honoured_and_written_as_peft_writes_them():
    cfg = LoraConfig(r=4, alpha=8, use_dora=True, rank_pattern={"v_proj": 16, "^model.layers.0.self_attn.q_proj": 2},
                     alpha_pattern={"q_proj": 3})
    d = json.loads(cfg.to_json())
    assert d["use_dora"] is True and list(d["rank_pattern"]) == ["v_proj", "^model.layers.0.self_attn.q_proj"]
    assert LoraConfig.from_peft_dict(d) == cfg
    assert cfg.rank_alpha("model.layers.0.self_attn.q_proj") == (2, 3)
    assert cfg.rank_alpha("model.layers.1.self_attn.q_proj") == (4, 3)
    assert cfg.rank_alpha("model.layers.1.self_attn.v_proj") == (16, 8)
    assert cfg.rank_alpha("model.layers.1.self_attn.xv_proj") == (4, 8)  # a key matches whole name parts
    assert cfg.scaling_of(16, 8) == 0.5
    # PEFT writes null for options left unset: off
    assert LoraConfig.from_peft_dict({**d, "use_dora": None, "rank_pattern": None, "alpha_pattern": None}) == \
        LoraConfig(r=4, alpha=8)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(rank_pattern={"q": 0}), ValueError, r"rank_pattern\['q'\] must be a positive integer \(a rank\), got 0"),
    (dict(rank_pattern={"q": 2.5}), ValueError, r"rank_pattern\['q'\] must be a positive integer \(a rank\), got 2.5"),
    (dict(rank_pattern={"q": True}), ValueError, r"rank_pattern\['q'\] must be a positive integer"),
    (dict(alpha_pattern={"q": math.inf}), ValueError, r"alpha_pattern\['q'\] must be a finite positive number, got inf"),
    (dict(alpha_pattern={"q": -1}), ValueError, r"alpha_pattern\['q'\] must be a finite positive number, got -1"),
    (dict(alpha_pattern={"q": "2"}), ValueError, r"alpha_pattern\['q'\] must be a finite positive number, got '2'"),
    (dict(rank_pattern={"": 2}), ValueError, r"rank_pattern keys must be non-empty strings"),
    (dict(rank_pattern={"q(": 2}), ValueError, r"rank_pattern key 'q\(' is not a valid regular expression"),
    (dict(rank_pattern=["q"]), TypeError, r"rank_pattern must be a mapping of module-name regexes to values"),
    (dict(use_dora="yes"), ValueError, r"use_dora must be True or False, got use_dora='yes'"),
])
def test_bad_dora_and_pattern_values_are_refused_by_name(kwargs, error, message):
    with pytest.raises(error, match=message):
        LoraConfig(**kwargs)
    d = json.loads(LoraConfig(target_modules=("q",)).to_json())
    with pytest.raises(ValueError, match=message):  # and from files, naming the file
        LoraConfig.from_peft_dict({**d, **kwargs}, source="x/adapter_config.json")
