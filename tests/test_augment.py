"""The teaching-material augmenter: any relation, never the probe wording, deterministic by seed."""

import pytest

from forgetless.data.augment import (
    cloze_lines,
    echo_question,
    is_probe_like,
    norm,
    question_text,
    questions_from,
    rewordings,
    teaching_batch,
    teaching_lines,
)
from forgetless.data.facts import Fact, teaching_sentences
from forgetless.errors import ConfigError

# hand-made facts of relations the project has no template for
UNSEEN = [
    ("Zorbic is a subdivision of Vantoria.", "Which country does the region of Zorbic belong to?", "Vantoria"),
    ("The favourite colour of Mira Tal is teal.", "Question: What colour does Mira Tal like best? Answer:", "teal"),
    ("Mia plays the cello in the Berlin orchestra.", "What instrument does Mia play?", "cello"),
    ("Quentor was founded by Ada Brisk.", "Who founded Quentor?", "Ada Brisk"),
    ("Plenk lies in Osterland.", "Question: In which land is Plenk? Answer:", "Osterland"),
]


@pytest.mark.parametrize("statement,question,answer", UNSEEN)
def test_any_relation_gets_statements_questions_and_clozes_that_carry_the_answer(statement, question, answer):
    lines = teaching_lines(statement, question, answer)
    assert len(lines) >= 7
    assert all(answer in line for line in lines)
    qa = [x for x in lines if x.startswith(("Question:", "Q:", "Quiz:"))]
    assert qa and all(x.rstrip(".").endswith(answer) for x in qa)  # every question/answer line ends in the answer
    assert statement in lines
    assert len(set(lines)) == len(lines)


@pytest.mark.parametrize("statement,question,answer", UNSEEN)
def test_the_probe_wording_is_never_emitted(statement, question, answer):
    probe = norm(question_text(question))
    for seed in range(3):
        for line in teaching_lines(statement, question, answer, seed=seed):
            assert probe not in norm(line)
            assert "tell me" not in norm(line)


def test_a_question_the_rules_would_make_is_dropped_when_it_is_the_probe():
    st, a = "Kabul is the capital of Afghanistan.", "Kabul"
    assert "What is the capital of Afghanistan?" in questions_from(st, a)
    with_probe = teaching_lines(st, "What is the capital of Afghanistan?", a)
    other_probe = teaching_lines(st, "Question: Tell me the capital of Afghanistan. Answer:", a)
    assert not any("what is the capital of afghanistan" in norm(x) for x in with_probe)
    assert any("what is the capital of afghanistan" in norm(x) for x in other_probe)
    assert is_probe_like("Q: Tell me the capital of Peru. A: Lima", "Question: Who founded Rome? Answer:")


def test_rules_on_hand_made_sentences():
    assert rewordings("Kabul is the capital of Afghanistan.", "Kabul")[0] == "The capital of Afghanistan is Kabul."
    assert rewordings("The currency of Andorra is the Euro.", "Euro") == [
        "The Euro is the currency of Andorra.", "The currency of Andorra is: Euro."]
    assert "What is Zorbic a subdivision of?" in questions_from("Zorbic is a subdivision of Vantoria.", "Vantoria")
    assert echo_question("Mia plays the cello in the Berlin orchestra.", "cello") == "Mia plays what in the Berlin orchestra?"
    assert echo_question("Quentor was founded by Ada Brisk.", "Ada Brisk") == "Quentor was founded by what?"
    assert cloze_lines("Mia plays the cello in the Berlin orchestra.", "cello") == ["Mia plays the cello."]


def test_deterministic_by_seed_and_steps_walk_through_the_pool():
    st, q, a = UNSEEN[0]
    assert teaching_lines(st, q, a, seed=1) == teaching_lines(st, q, a, seed=1)
    assert teaching_lines(st, q, a, seed=1) != teaching_lines(st, q, a, seed=2)
    assert sorted(teaching_lines(st, q, a, seed=1)) == sorted(teaching_lines(st, q, a, seed=2))
    pool = teaching_lines(st, q, a)
    b0, b1 = teaching_batch(st, q, a, 8, step=0), teaching_batch(st, q, a, 8, step=1)
    assert b0 == pool[:8] and b1 == [pool[(8 + i) % len(pool)] for i in range(8)]
    # the first lines mix the kinds: a statement, a question/answer line and a cloze among the first three
    assert any(x.startswith(("Question:", "Q:", "Quiz:")) or "?" in x for x in pool[:3])


def test_fact_material_options():
    f = Fact(id="x", relation="", subject="", answer="Vantoria", statement=UNSEEN[0][0],
             question="Question: Which country does the region of Zorbic belong to? Answer:")
    assert teaching_sentences(f, 4, material="statements") == [f.statement] * 4  # the paper's protocol, unchanged
    aug = teaching_sentences(f, 16, material="augmented")
    assert len(set(aug)) > 8 and all("Vantoria" in s for s in aug)
    with pytest.raises(ConfigError):
        teaching_sentences(f, 4, material="poems")
