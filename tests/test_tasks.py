import copy

import pytest
import yaml

from xprompt.errors import XPromptError
from xprompt.tasks import DEFAULT_TASKS_DIR, load_task, parse_task, task_names, template_parts

XNLI_LANGS = "en fr es de el bg ru tr ar vi th zh hi sw ur ko".split()


@pytest.mark.parametrize("name", task_names())
def test_every_task_card_loads(name):
    task = load_task(name)
    assert task.name == name
    assert set(task.split_languages("dev")) == set(task.languages)
    for lang, spec in task.languages.items():
        assert set(spec.label_words) == set(task.labels), lang


def test_xnli_and_pawsx_languages_and_labels():
    xnli, pawsx = load_task("xnli"), load_task("pawsx")
    assert xnli.language_codes == XNLI_LANGS
    assert xnli.labels == ("entailment", "neutral", "contradiction")
    assert sorted(pawsx.language_codes) == sorted("en de es fr ja ko zh".split())
    assert pawsx.labels == ("0", "1")
    # label words are keyed by label name: 1 means paraphrase, so "Yes" belongs to "1"
    assert pawsx.languages["en"].label_words == {"0": "No", "1": "Yes"}
    assert xnli.split_languages("train") == ["en"]
    assert pawsx.splits["test"].path_for("fr") == "pawsx/test_enproj.fr.jsonl.gz"
    assert pawsx.splits["test"].path_for("de") == "pawsx/test.de.jsonl.gz"
    assert xnli.splits["dev"].path_for("ko") == "kornli_xnli/dev.ko.jsonl.gz"


def test_chinese_cards_and_label_maps():
    for name in ("ocnli", "afqmc", "bustm", "tnews", "iflytek", "csl", "eprstmt", "chnsenticorp"):
        task = load_task(name)
        assert task.language_codes == ["zh"] and task.source_language == "zh", name
    assert len(load_task("iflytek").labels) == 119
    assert len(load_task("tnews").labels) == 15 and "105" not in load_task("tnews").labels
    ocnli, afqmc = load_task("ocnli"), load_task("afqmc")
    assert ocnli.drop_labels == ("-",)
    assert ocnli.bridge_from("xnli", ["entailment", "neutral", "contradiction"]) == [0, 1, 2]
    # a source whose labels come in another order is mapped by name, not by position
    assert ocnli.bridge_from("xnli", ["contradiction", "entailment", "neutral"]) == [2, 0, 1]
    assert afqmc.bridge_from("pawsx", ["0", "1"]) == [0, 1]
    with pytest.raises(XPromptError, match="task afqmc declares no label map from xnli"):
        afqmc.bridge_from("xnli", ["entailment", "neutral", "contradiction"])
    with pytest.raises(XPromptError, match="transfer.xnli must map every label"):
        card = _card()
        card["transfer"] = {"xnli": {"entailment": "entailment"}}
        parse_task(card, "x.yaml")


def test_template_parts_never_evaluates():
    assert template_parts("{a} ? <mask> , {b}") == [
        ("field", "a"), ("text", " ? "), ("mask", ""), ("text", " , "), ("field", "b")]


def _card():
    return copy.deepcopy(yaml.safe_load((DEFAULT_TASKS_DIR / "xnli.yaml").read_text()))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(template="{premise} {hypothesis}"), "exactly one <mask>"),
        (lambda c: c.update(template="{premise} <mask> <mask> {hypothesis}"), "exactly one <mask>"),
        (lambda c: c.update(template="{premise} <mask>"), "lacks field(s) {hypothesis}"),
        (lambda c: c.update(template="{premise} <mask> {hypothesis} {extra}"), "unknown field(s) extra"),
        (lambda c: c.update(template="{premise.__class__} <mask> {hypothesis}"), "plain field name"),
        (lambda c: c["languages"]["de"]["label_words"].update(neutral="Ja"), "label word(s) Ja used for more than one"),
        (lambda c: c["languages"]["fr"]["label_words"].pop("neutral"), "languages.fr: label_words lacks label(s) neutral"),
        (lambda c: c.pop("labels"), "missing required key 'labels'"),
        (lambda c: c["splits"].update(valid={"file": "x"}), "unknown split 'valid'"),
        (lambda c: c.update(source_language="xx"), "source_language 'xx'"),
    ],
)
def test_bad_cards_give_one_line_errors(mutate, message):
    card = _card()
    mutate(card)
    with pytest.raises(XPromptError) as info:
        parse_task(card, "xnli.yaml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_task_and_bad_yaml(tmp_path):
    with pytest.raises(XPromptError, match="unknown task 'nope'.*known tasks: .*xnli"):
        load_task("nope")
    (tmp_path / "broken.yaml").write_text("name: broken\nfields: [a\n")
    with pytest.raises(XPromptError, match=r"broken.yaml:\d+: not valid YAML"):
        load_task("broken", tmp_path)


def test_unknown_language_lists_known(xnli):
    with pytest.raises(XPromptError, match="unknown language.*xx; known: en, fr"):
        xnli.check_languages(["de", "xx"])
    with pytest.raises(XPromptError, match="train split of xnli: zh; known: en"):
        xnli.check_languages(["zh"], "train")


def test_train_defaults_are_validated():
    card = _card()
    card["train_defaults"] = {"epochs": 3}
    with pytest.raises(XPromptError, match="train_defaults may set only lr"):
        parse_task(card, "x.yaml")
    card["train_defaults"] = {"lr": "fast"}
    with pytest.raises(XPromptError, match="must be numbers"):
        parse_task(card, "x.yaml")
