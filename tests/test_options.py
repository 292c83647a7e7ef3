"""Typed method options: one ``Options`` dataclass per method and plugin is the single source of
defaults, parsed like the rest of the config, validated with one sentence, shown by ``describe()``,
``forgetless methods`` and the ``forgetless learn`` flags."""

import dataclasses
import json
from dataclasses import asdict

import pytest
import torch

from forgetless.cli import _method_options, build_parser, main
from forgetless.errors import ConfigError
from forgetless.methods import (
    METHODS,
    PLUGINS,
    MethodOptions,
    default_options,
    fact_methods,
    make_method,
    make_plugin,
    options_table,
)
from forgetless.methods.base import Method, nest, unnest, unnest_list

# describe() keys that report what a method did at run time, on top of its options
RUNTIME_KEYS = {
    "agem": {"projected_steps", "steps"},
    "packnet": {"growth", "linear_params", "free_params"},
    "adapters": {"growth", "router_valid_accuracy"},
    "progressive": {"growth", "base_params", "router_valid_accuracy"},
    "onpolicy_distill": {"mean_kl"},
    "rl": {"mean_reward"},
    "rome": {"edits", "last_edits"},
    "memit": {"edits", "last_edits"},
    "titans": {"variant"},
    "cartridges": {"cartridge_bytes"},
    # the penalty methods: how many importance terms they hold (and their size after an experience)
    **{n: {"importance_terms"} for n in ("ewc", "online_ewc", "si", "mas")},
    **{n: {"history"} for n in ("merge", "task_arithmetic", "ties", "dare", "dare_ties", "stitch", "stitch_learned")},
}

# the learning rates `forgetless run` (runner.DEFAULT_LRS) and `forgetless learn` (cli.DEFAULT_LR)
# used before the Options became the one source: the README figures were made with these
# (smf: 30 since issue 12, with protect 0.9, chosen on validation facts: docs/smf.md; the configs
# whose figures were made at 3 pin lr 3 and protect 0)
UNIFIED_LRS = {"full": 1e-5, "lora": 1e-4, "smf": 30.0, "eaft": 1e-5, "adapters": 1e-4, "retrieval": 0.0,
               "cms": 1e-5, "ewc": 1e-5, "online_ewc": 1e-5, "si": 1e-5, "mas": 1e-5, "replay": 1e-5,
               "generative_replay": 1e-5, "agem": 1e-5, "distill": 1e-5, "lwf": 1e-5, "packnet": 1e-5,
               "merge": 1e-5, "ties": 1e-5, "stitch_learned": 1e-5}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_builds_without_options_and_describes_its_options(name):
    m = make_method(name)
    cls = METHODS[name]
    assert isinstance(m.options, cls.Options) and isinstance(m.options, MethodOptions)
    assert cls.options_cls is cls.Options
    for parent in cls.__mro__[1:]:  # each Options extends its parent class's Options
        if issubclass(parent, Method):
            assert issubclass(cls.Options, parent.Options)
            break
    d = m.describe()
    extra = RUNTIME_KEYS.get(name, set())
    assert d == {"method": name, **asdict(m.options), **{k: d[k] for k in extra}}
    assert set(d) - set(asdict(m.options)) == {"method", *extra}
    assert m.lr == m.options.lr
    assert not hasattr(m, "hparams")


def test_the_learning_rate_defaults_are_the_ones_run_and_learn_used():
    for name, lr in UNIFIED_LRS.items():
        assert make_method(name).lr == lr, name
        assert default_options(name).lr == lr
    table = options_table()
    assert {n: e["options"][0] for n, e in table.items() if n in UNIFIED_LRS} == {
        n: {"name": "lr", "type": "float", "default": lr} for n, lr in UNIFIED_LRS.items()}


def test_options_table_lists_types_and_defaults_from_the_dataclasses():
    smf = options_table("smf")["smf"]
    assert smf["kind"] == "method" and smf["learns_facts"] is True
    assert smf["options"] == [{"name": "lr", "type": "float", "default": 30.0},
                              {"name": "top_t", "type": "int", "default": 500},
                              {"name": "ranking", "type": "str", "default": "tfidf"},
                              {"name": "background", "type": "str", "default": "mix"},
                              {"name": "protect", "type": "float", "default": 0.9},
                              {"name": "max_doc_rate", "type": "float", "default": 1.0}]
    table = options_table()
    assert set(table) == set(METHODS) | set(PLUGINS)
    assert [o["name"] for o in table["continual_backprop"]["options"]] == ["rate", "maturity", "decay", "seed"]
    # fixed fields (init=False) are not options: lwf always distils forward on the current batch
    assert "kl" not in [o["name"] for o in table["lwf"]["options"]]
    assert "how" not in [o["name"] for o in table["ties"]["options"]]
    assert {o["name"]: o["default"] for o in table["lora"]["options"]}["target_modules"][0] == "q_proj"
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        options_table("nope")


def test_learn_offers_the_methods_that_learn_in_one_experience():
    names = fact_methods()
    assert {"full", "lora", "smf", "eaft", "retrieval"} <= set(names)
    assert not {"ewc", "si", "mas", "agem", "packnet", "adapters", "merge", "ties", "generative_replay"} & set(names)
    learn = next(a for a in build_parser()._subparsers._group_actions[0].choices["learn"]._actions
                 if a.dest == "method")
    assert list(learn.choices) == names


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(".")
    return msg


def test_an_unknown_option_names_the_method_and_the_key():
    with pytest.raises(ConfigError) as e:
        make_method("smf", top_k=3)
    msg = _one_line(e)
    assert "'smf.top_k'" in msg and "top_t" in msg  # the valid keys are listed
    with pytest.raises(ConfigError, match="'lwf.kl'"):  # fixed by the method, not an option
        make_method("lwf", kl="reverse")
    with pytest.raises(ConfigError, match="'ties.how'"):
        make_method("ties", how="dare")
    with pytest.raises(ConfigError, match="'continual_backprop.speed'"):
        make_plugin({"name": "continual_backprop", "speed": 1})


def test_a_wrong_type_names_the_method_and_the_key():
    with pytest.raises(ConfigError) as e:
        make_method("full", lr="fast")
    assert _one_line(e) == "config key 'full.lr' expects a number, got 'fast'."
    with pytest.raises(ConfigError, match="'lora.rank' expects an integer, got 4.5"):
        make_method("lora", rank=4.5)
    with pytest.raises(ConfigError, match="'ewc.online' expects true or false"):
        make_method("ewc", online="yes")


def test_a_numeric_string_is_read_as_a_number():
    # PyYAML (YAML 1.1) loads `lr: 1e-4` as the string "1e-4": it is accepted where a float is expected
    import yaml

    assert yaml.safe_load("lr: 1e-4") == {"lr": "1e-4"}
    assert make_method("lora", **yaml.safe_load("lr: 1e-4")).lr == 1e-4
    assert make_method("smf", lr="3").lr == 3.0
    with pytest.raises(ConfigError, match="expects a number, got '1e-4x'"):
        make_method("lora", lr="1e-4x")
    with pytest.raises(ConfigError, match="expects an integer, got '500'"):  # integers are not read from text
        make_method("smf", top_t="500")


@pytest.mark.parametrize("name,opts,sentence", [
    ("smf", {"top_t": -10}, "smf option 'top_t' must be a positive integer, got -10."),
    ("full", {"lr": 0}, "full option 'lr' must be > 0, got 0.0."),
    ("lora", {"lr": -1e-4}, "lora option 'lr' must be > 0, got -0.0001."),
    ("smf", {"ranking": "idf"}, "smf option 'ranking' must be one of 'tfidf', 'tf', 'all', got 'idf'."),
    ("packnet", {"keep": 1.5}, "packnet option 'keep' must be a fraction in [0, 1], got 1.5."),
    ("merge", {"density": 1.5}, "merge option 'density' must be in (0, 1], got 1.5."),
    ("ewc", {"gamma": 2.0}, "ewc option 'gamma' must be in [0, 1], got 2.0."),
    ("replay", {"buffer_size": 0}, "replay option 'buffer_size' must be a positive integer, got 0."),
    ("retrieval", {"lr": -1.0}, "retrieval option 'lr' must be >= 0, got -1.0."),
    ("generative_replay", {"top_p": 0.0}, "generative_replay option 'top_p' must be in (0, 1], got 0.0."),
])
def test_an_out_of_range_option_is_one_sentence(name, opts, sentence):
    with pytest.raises(ConfigError) as e:
        make_method(name, **opts)
    assert _one_line(e) == sentence


def test_plugin_options_are_typed_too():
    with pytest.raises(ConfigError, match="continual_backprop option 'rate' must be in \\[0, 1\\], got 2.0."):
        make_method("full", continual_backprop={"rate": 2.0})
    m = make_method("ewc", plugins=[{"name": "continual_backprop", "maturity": 5}])
    assert m.describe()["plugins"] == [{"name": "continual_backprop", "rate": 1e-4, "maturity": 5, "decay": 0.99,
                                        "seed": 0}]


def test_an_options_object_or_a_positional_lr_builds_the_same_method():
    from forgetless.methods.lora import LoRA

    a = LoRA(LoRA.Options(rank=8))
    b = make_method("lora", rank=8)
    assert a.describe() == b.describe() and a.options.alpha == 16.0
    assert LoRA(3e-4, rank=8).lr == 3e-4
    with pytest.raises(ConfigError, match="takes one"):
        LoRA(LoRA.Options(rank=8), rank=4)


def test_validate_normalises_derived_defaults():
    lora = make_method("lora", rank=4, target_modules="q_proj")
    assert lora.options.alpha == 8.0 and lora.options.target_modules == ["q_proj"]
    assert make_method("ties").options.density == 0.2 and make_method("dare").options.density == 0.1
    assert make_method("merge", lambdas=2).options.lambdas == [2.0]
    assert make_method("full", betas=[0.8, 0.9]).options.betas == (0.8, 0.9)


def test_nest_and_unnest_are_inverse():
    t = {"a.b": torch.ones(2), "c": torch.zeros(1)}
    state = {**nest("fisher.0", t), **nest("fisher.1", {"a.b": torch.full((2,), 2.0)}), **nest("anchor", t)}
    assert set(state) == {"fisher.0.a.b", "fisher.0.c", "fisher.1.a.b", "anchor.a.b", "anchor.c"}
    assert unnest("anchor", state).keys() == t.keys()
    items = unnest_list("fisher", state)
    assert [sorted(i) for i in items] == [["a.b", "c"], ["a.b"]] and float(items[1]["a.b"][0]) == 2.0
    assert unnest("fisher.1", {"fisher.10.x": torch.ones(1)}) == {}


def test_state_round_trip_through_nest_keeps_every_tensor():
    from forgetless.methods.plasticity import ContinualBackprop

    cbp = ContinualBackprop()
    cbp.utility, cbp.age, cbp.pending, cbp.replaced = ({"m.l": torch.arange(3.0)}, {"m.l": torch.arange(3)},
                                                       {"m.l": 0.25}, 7)
    state = cbp.state_tensors()
    assert set(state) == {"replaced", "utility.m.l", "age.m.l", "pending.m.l"}
    other = ContinualBackprop()
    other.load_state_tensors(state)
    assert other.replaced == 7 and other.pending == {"m.l": 0.25}
    assert torch.equal(other.utility["m.l"], cbp.utility["m.l"]) and torch.equal(other.age["m.l"], cbp.age["m.l"])


def test_learn_flags_and_option_pairs_go_through_the_options():
    args = build_parser().parse_args(["learn", "--facts", "f.jsonl", "--method", "smf", "--top-t", "100",
                                      "--option", "ranking=tf", "--option", "lr=1e-4"])
    opts = _method_options(args)
    assert opts == {"top_t": 100, "ranking": "tf", "lr": "1e-4"}
    m = make_method("smf", **opts)
    assert (m.top_t, m.ranking, m.lr) == (100, "tf", 1e-4)
    args = build_parser().parse_args(["learn", "--facts", "f.jsonl", "--method", "full", "--rank", "8"])
    with pytest.raises(ConfigError, match="--rank is not an option of method 'full'"):
        _method_options(args)
    args = build_parser().parse_args(["learn", "--facts", "f.jsonl", "--option", "top_t"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        _method_options(args)


def test_learn_refuses_a_bad_option_before_loading_anything(tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"statement": "Zorb lives in Paris.", "question": "Where does Zorb live?",
                                 "answer": "Paris"}) + "\n")
    assert main(["learn", "--facts", str(facts), "--method", "smf", "--option", "top_t=-10",
                 "--model", str(tmp_path / "no-model")]) == 2
    assert capsys.readouterr().err.strip() == ("forgetless: error: smf option 'top_t' must be a positive integer, "
                                               "got -10.")


def test_methods_command_prints_the_table(capsys):
    assert main(["methods", "smf", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == options_table("smf")
    assert main(["methods", "lora"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("lora (learns facts): ") and "  rank" in out and "default 32" in out
    assert main(["methods", "nope"]) == 2


def test_run_config_reports_a_bad_method_option_with_path_and_key(tmp_path):
    from forgetless.experiments.runner import load_run_config

    cfg = tmp_path / "run.yaml"
    cfg.write_text("name: t\nexperiments:\n  - name: e\n    stream: {kind: facts}\n"
                   "    methods:\n      - {name: naive}\n      - {name: smf, top_k: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_run_config(cfg)
    msg = _one_line(e)
    assert msg.startswith(f"{cfg}: experiments[0].methods[1]: ") and "'smf.top_k'" in msg
    cfg.write_text("name: t\nexperiments:\n  - name: e\n    stream: {kind: facts}\n"
                   "    methods:\n      - {name: lora, lr: 1e-4, rank: 0}\n")
    with pytest.raises(ConfigError, match="methods\\[0\\]: lora option 'rank' must be a positive integer, got 0."):
        load_run_config(cfg)
    cfg.write_text("name: t\nexperiments:\n  - name: e\n    stream: {kind: facts}\n"
                   "    methods:\n      - {name: lora, lr: 1e-4}\n      - {name: naive}\n")
    assert load_run_config(cfg).experiments[0].methods[0] == {"name": "lora", "lr": "1e-4"}


def test_every_options_field_has_a_default():
    for cls in [*METHODS.values(), *PLUGINS.values()]:
        for f in dataclasses.fields(cls.Options):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, (cls, f.name)


def test_a_new_method_may_name_its_options_options_cls():
    """The pattern other method files copy: a module-level Options and ``options_cls = Options``."""
    from dataclasses import dataclass

    from forgetless.methods.full import FullFinetune

    @dataclass
    class ProgressiveOptions(FullFinetune.Options):
        columns: int = 2

        def validate(self) -> None:
            super().validate()
            self.positive("columns", integer=True)

    class Progressive(FullFinetune):
        name = "progressive_test"
        options_cls = ProgressiveOptions

    assert Progressive.Options is ProgressiveOptions
    m = Progressive(columns=3)
    assert m.describe() == {"method": "progressive_test", "lr": 1e-5, "weight_decay": 0.1, "betas": (0.9, 0.95),
                            "columns": 3}
    with pytest.raises(ConfigError, match="progressive_test option 'columns' must be a positive integer, got 0."):
        Progressive(columns=0)
    with pytest.raises(ConfigError, match="unknown config key 'progressive_test.rows'"):
        Progressive(rows=1)
