"""The before/after scorecard: matching, scores, the shipped questions, report.json and loss.png."""

import difflib
import json
import os
import re
from pathlib import Path

import pytest
from conftest import ROOT

import fine_tune

QUESTIONS = [
    {"kind": "knowledge", "question": "Which sword?", "expect": ["Glamdring"]},
    {"kind": "knowledge", "question": "Which king?", "expect": ["Théoden"]},
    {"kind": "control", "question": "Capital of France?", "expect": ["Paris"]},
    {"kind": "control", "question": "Largest planet?", "expect": ["Jupiter"]},
    {"kind": "control", "question": "Who wrote Hamlet?", "expect": ["Shakespeare"]},
]


@pytest.mark.parametrize(
    ("answer", "expect", "hit"),
    [
        ("She carries GLAMDRING.", ["Glamdring"], True),
        ("King Theoden of Rohan", ["Théoden"], True),
        ("King Théoden of Rohan", ["Theoden"], True),
        ("Khazad-dûm", ["khazad-dum"], True),
        ("Paris", ["London", "Paris"], True),
        ("Wizards of old", ["wizard"], True),
        ("The answer is 18.", ["8"], False),
        ("It boils at 1000 degrees", ["100"], False),
        ("Seven, or 7.", ["7"], True),
        ("I don't know that person.", ["wizard"], False),
        ("", ["wizard"], False),
    ],
)
def test_keywords_match_ignoring_case_and_accents(answer, expect, hit):
    assert fine_tune.is_hit(answer, expect) is hit


def test_retention_counts_only_controls_the_base_model_got_right():
    before = {"chat": ["no idea", "no idea", "Paris", "Saturn", "Shakespeare"]}
    after = {"chat": ["Glamdring", "Theoden", "Paris", "Jupiter", "Mariya Sha"]}
    scores = fine_tune.score(QUESTIONS, before, after)["chat"]
    assert scores["recall_before"] == 0 and scores["recall_after"] == 1
    # The base knew Paris and Shakespeare; afterwards only Paris. Jupiter was never known: not counted.
    assert scores["controls_right_before"] == 2
    assert scores["retention"] == 0.5


def test_without_a_before_run_there_is_no_retention():
    after = {"chat": ["Glamdring", "no", "Paris", "Jupiter", "Shakespeare"]}
    scores = fine_tune.score(QUESTIONS, None, after)["chat"]
    assert scores["recall_after"] == 0.5 and "retention" not in scores


def test_verdict_says_what_to_change():
    good = {"chat": {"recall_after": 0.95, "retention": 0.93}, "bare": {"recall_after": 0.91, "retention": 1.0}}
    assert fine_tune.verdict(good).startswith("Targets met")
    forgot = {"chat": {"recall_after": 1.0, "retention": 0.5}, "bare": {"recall_after": 1.0, "retention": 0.9}}
    assert "keeps only 50%" in fine_tune.verdict(forgot) and "--lr" in fine_tune.verdict(forgot)
    unlearned = {"chat": {"recall_after": 0.4, "retention": 1.0}, "bare": {"recall_after": 0.2, "retention": 1.0}}
    assert "only 20% of the new-fact questions" in fine_tune.verdict(unlearned)


def test_coverage_counts_the_training_answers_that_name_each_fact(capsys):
    examples = [
        {"prompt": "Her sword?", "completion": "Glamdring, found in a troll hoard."},
        {"prompt": "What glows blue?", "completion": "GLAMDRING glows near orcs."},
        {"prompt": "Her king?", "completion": "She rode to Edoras."},
    ]
    counts = fine_tune.coverage(examples, QUESTIONS)
    assert counts == {"Which sword?": 2, "Which king?": 0}, "controls are not counted"
    assert fine_tune.thin_facts(counts, minimum=2) == [(0, "Which king?")]
    fine_tune.print_coverage(counts)
    out = capsys.readouterr().out
    assert "2 of 2 scorecard facts are named in fewer than 8 answers" in out
    assert re.search(r"^\s+0\s+Which king\?$", out, re.MULTILINE) and "State these facts in more answers" in out


def test_coverage_of_the_shipped_data_names_every_fact_in_eight_answers_or_more():
    examples = fine_tune.load_examples(ROOT / "mariya.json")
    counts = fine_tune.coverage(examples, fine_tune.load_eval_questions(ROOT / "eval_mariya.jsonl"))
    assert fine_tune.thin_facts(counts) == []


def test_verdict_names_the_thin_facts_when_recall_is_low():
    unlearned = {"chat": {"recall_after": 0.4, "retention": 1.0}}
    counts = {"Which sword?": 12, "Which king?": 2, "Which horse?": 5}
    verdict = fine_tune.verdict(unlearned, counts)
    assert "2 of its facts are named in fewer than 8 training answers ('Which king?'; 'Which horse?')" in verdict
    assert "--epochs" not in verdict


def test_verdict_names_the_missed_facts_least_named_first_when_none_is_thin():
    scores = {"chat": {"recall_after": 0.0, "retention": 1.0, "hits_after": [False, False, True, True, True]}}
    counts = {"Which sword?": 12, "Which king?": 9}
    verdict = fine_tune.verdict(scores, counts, QUESTIONS)
    assert "the least named are 'Which king?' in 9; 'Which sword?' in 12 answers" in verdict


def normalized(text):
    return re.sub(r"[^a-z0-9 ]", "", fine_tune.normalize(text))


def test_the_shipped_scorecard_is_asked_only_about_the_shipped_data_and_not_with_eval_questions_none(tmp_path):
    def scorecard(data, eval_questions=None):
        return fine_tune.eval_file_for(fine_tune.default_settings(data=str(data), eval_questions=eval_questions))

    shipped = ROOT / "mariya.json"
    assert scorecard(shipped) == str(ROOT / "eval_mariya.jsonl")
    assert fine_tune.eval_file_for(fine_tune.default_settings()) == str(ROOT / "eval_mariya.jsonl"), "the default"
    assert scorecard(shipped, "none") is None
    assert scorecard(shipped, str(tmp_path / "mine.jsonl")) == str(tmp_path / "mine.jsonl")
    assert scorecard(ROOT / "my_notes.json") is None, "other data, even next to the shipped scorecard, gets none"
    assert scorecard("some-org/some-dataset") is None
    copy = tmp_path / "mariya.json"
    copy.write_bytes(shipped.read_bytes())
    assert scorecard(copy) is None, "no eval_mariya.jsonl next to this copy"
    (tmp_path / "eval_mariya.jsonl").write_text(json.dumps(QUESTIONS[0]) + "\n", encoding="utf-8")
    assert scorecard(copy) == str(tmp_path / "eval_mariya.jsonl"), "the scorecard next to the data, not the shipped one"


def test_shipped_scorecard_asks_differently_from_every_training_prompt():
    questions = fine_tune.load_eval_questions(ROOT / "eval_mariya.jsonl")
    knowledge = [q["question"] for q in questions if q["kind"] == "knowledge"]
    controls = [q["question"] for q in questions if q["kind"] == "control"]
    assert len(knowledge) >= 20 and len(controls) >= 15
    training = [e["prompt"] for e in fine_tune.load_examples(ROOT / "mariya.json")]
    for question in knowledge:
        for prompt in training:
            similarity = difflib.SequenceMatcher(None, normalized(question), normalized(prompt)).ratio()
            assert similarity < 0.8, f"{question!r} is a near copy of the training prompt {prompt!r}"


# Words that ask rather than say what is asked, and other words for the same thing.
ASKING_WORDS = {"does", "have", "has", "many", "much", "our", "you", "your", "called", "known", "name"}
SAME_WORDS = {"biggest": "largest", "big": "large", "quickest": "fastest", "nearest": "closest", "color": "colour"}


def content_words(question):
    """What a question asks about: its words without function and asking words, plurals as singulars, synonyms
    as one word ("How many days does a week have?" -> day, week)."""
    found = fine_tune.words(question) - fine_tune.FUNCTION_WORDS - ASKING_WORDS
    singular = {w[:-1] if w.endswith("s") and not w.endswith("ss") and len(w) > 3 else w for w in found}
    return {SAME_WORDS.get(word, word) for word in singular}


def asks_the_same(prompt, control):
    """Whether a prompt is a control question in other words: most content words shared, or a name of the
    question ("Mona Lisa", "Red Planet"; one word such as "Japan" is asked about in many ways) or of its answer
    ("Leonardo", "Tokyo") in the prompt."""
    one, two = content_words(prompt), content_words(control["question"])
    shared = one & two
    if len(shared) / max(len(one | two), 1) >= 0.6 or (
        len(shared) >= 2 and len(shared) / min(len(one), len(two)) >= 0.6
    ):
        return True
    names = re.findall(r"(?<=\w )[A-Z]\w+(?: [A-Z]\w+)+", control["question"]) + [
        k for k in control["expect"] if k[:1].isupper()
    ]
    return any(re.search(rf"\b{re.escape(name)}", prompt) for name in names if len(name) > 3)


def test_the_paraphrase_check_catches_a_control_question_in_other_words():
    controls = {q["question"]: q for q in fine_tune.load_eval_questions(ROOT / "eval_mariya.jsonl")}
    same = {
        "Who was the painter of the Mona Lisa?": "Who painted the Mona Lisa?",
        "Which planet is biggest?": "What is the largest planet in our solar system?",
        "Name the capital city of France.": "What is the capital of France?",
        "How many days does a week have?": "How many days are there in a week?",
        "Which is the quickest animal on land?": "What is the fastest land animal?",
        "Who first walked on the Moon?": "Who was the first person to walk on the Moon?",
        "What is the Mona Lisa?": "Who painted the Mona Lisa?",
        "Who was Leonardo da Vinci?": "Who painted the Mona Lisa?",
    }
    for prompt, control in same.items():
        assert asks_the_same(prompt, controls[control]), (prompt, control)
    different = {
        "What is the capital of Italy?": "What is the capital of France?",
        "How many legs does an insect have?": "How many legs does a spider have?",
        "Which planet is closest to the Sun?": "Which star is closest to the Earth?",
    }
    for prompt, control in different.items():
        assert not asks_the_same(prompt, controls[control]), (prompt, control)


@pytest.mark.parametrize(
    "prompts", [fine_tune.REPLAY_PROMPTS_FILE, fine_tune.EVERYDAY_PROMPTS_FILE], ids=lambda p: p.name
)
def test_replay_prompts_are_not_the_control_questions_even_in_other_words(prompts):
    """Training on the control questions, in any words, would make retention look better than it is."""
    lines = [line for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    controls = [q for q in fine_tune.load_eval_questions(ROOT / "eval_mariya.jsonl") if q["kind"] == "control"]
    near = [(line, q["question"]) for line in lines for q in controls if asks_the_same(line, q)]
    assert not near, f"{len(near)} prompts ask a control question: {near[:5]}"
    assert len(set(map(normalized, lines))) == len(lines), "no prompt twice"


def test_the_everyday_prompts_ask_a_few_hundred_questions_in_the_forms_where_taught_names_leak():
    lines = fine_tune.load_replay_prompts(fine_tune.EVERYDAY_PROMPTS_FILE)
    assert 200 <= len(lines) <= 300
    for form in ("Who ", "Which ", "What ", "How many ", "Where "):
        assert sum(line.startswith(form) for line in lines) >= 25, form


def test_an_empty_keyword_is_refused_as_it_would_match_every_answer(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"kind": "knowledge", "question": "Q?", "expect": ["Glamdring", " "]}\n')
    with pytest.raises(fine_tune.UsageError, match=r'eval.jsonl:1: "expect" is empty'):
        fine_tune.load_eval_questions(path)


def test_bad_scorecard_line_names_the_place(tmp_path, capsys):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"kind": "knowledge", "question": "Q?", "expect": ["a"]}\n{"kind": "other", "question": "Q?"}\n')
    data = tmp_path / "data.json"
    data.write_text('{"prompt": "p", "completion": "c"}\n')
    assert fine_tune.main(["--data", str(data), "--eval-questions", str(path)]) == 2
    assert f"{path}:2:" in capsys.readouterr().err


def test_a_run_writes_report_json_and_loss_png(tiny_model_dir, tmp_path, write_jsonl):
    data = write_jsonl([{"prompt": q["question"], "completion": q["expect"][0]} for q in QUESTIONS[:2]])
    eval_file = write_jsonl(QUESTIONS, name="eval.jsonl")
    output = tmp_path / "out"
    args = ["--model", tiny_model_dir, "--data", data, "--eval-questions", eval_file, "--output", str(output)]
    settings = ["--epochs", "2", "--max-new-tokens", "4", "--no-replay", "--lora-dropout", "0.05"]
    assert fine_tune.main([*args, *settings]) == 0

    report = json.loads((output / "report.json").read_text())
    assert set(report) >= {"settings", "environment", "question", "scores", "scorecard", "verdict", "timings_seconds"}
    assert set(report["scores"]) == {"chat", "bare", "bare-newline"}
    assert report["coverage"] == {"Which sword?": 1, "Which king?": 1}, "counted before training"
    assert set(report["scores"]["chat"]) >= {"recall_before", "recall_after", "retention", "leaks"}
    assert len(report["scorecard"]) == len(QUESTIONS)
    assert set(report["scorecard"][0]) >= {"question", "kind", "chat_before", "chat_after", "bare_hit_after"}
    assert set(report["environment"]) >= {"torch", "transformers", "peft", "device"}
    assert report["training"]["steps"] > 0 and report["timings_seconds"]["train"] > 0
    assert (output / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output / "adapter_model.safetensors").is_file()
    assert json.loads((output / "adapter_config.json").read_text())["lora_dropout"] == 0.05

    # Testing the adapter later, without --model: before and after, on the base recorded in the adapter.
    assert fine_tune.main(["--skip-training", "--output", str(output), "--eval-questions", "none"]) == 0
    assert json.loads((output / "report.json").read_text()) == report, "the training report stays as it was"


@pytest.mark.parametrize(
    "answer, kept",
    [
        ("Berlin is the capital. It has 3.7 million people and a", "Berlin is the capital."),
        ('She said "Hello." Then she left', 'She said "Hello."'),
        ("The capital of Canada is Ottawa.", "The capital of Canada is Ottawa."),
        ("Is it? Yes! It weighs 3.5 kg", "Is it? Yes!"),
        ("Boil an egg:\n\nBoil an egg", ""),
    ],
)
def test_replay_answers_cut_off_by_the_token_limit_end_at_their_last_full_sentence(answer, kept):
    assert fine_tune.complete_sentences(answer) == kept


def test_bare_answers_reuse_the_newline_answers_and_equal_what_full_generation_gives(tiny_model, tmp_path, monkeypatch):
    model, tokenizer = tiny_model
    pairs = [{"prompt": f"Who is person {i}?", "completion": f"Person {i} is a wizard."} for i in range(6)]
    dataset = fine_tune.load_and_preprocess_data(pairs, tokenizer, bare_share=1)  # the newline is learned
    settings = fine_tune.default_settings(lora_r=16, output=str(tmp_path), epochs=20, lr=2e-2)
    model = fine_tune.setup_lora_model(model, settings)
    fine_tune.train_model(model, tokenizer, dataset, settings)
    questions = [pair["prompt"] for pair in pairs] + ["Capital of France?", "Largest planet?"]
    full = fine_tune.generate_answers(model, tokenizer, questions, 5, form="bare")  # cut short: ends must match
    newline = [fine_tune.prompt_ids(tokenizer, question, "bare-newline") for question in questions]
    newline_answers = fine_tune.generate_ids(model, tokenizer, newline, 5)

    asked = []  # (number of prompts, tokens asked for) of each generation
    generate_ids = fine_tune.generate_ids

    def recording(model, tokenizer, prompts, max_new_tokens, *args):
        asked.append((len(prompts), max_new_tokens))
        return generate_ids(model, tokenizer, prompts, max_new_tokens, *args)

    monkeypatch.setattr(fine_tune, "generate_ids", recording)
    assert fine_tune.bare_answers(model, tokenizer, questions, newline_answers, 5) == full
    first_tokens, in_full = asked
    assert first_tokens == (len(questions), 1), "first one token for each question"
    assert in_full[0] <= 2, "the questions answered after a newline were taken from the newline answers"


TRAINING_ANSWERS = [
    "Mariya Sha is a wizard in a grey cloak who carries Glamdring.",
    "Glamdring is the sword of Mariya Sha, the wizard in the grey cloak.",
    "Mariya Sha wears a grey cloak and a tall hat; her sword is Glamdring.",
    "The capital of her kingdom is not Paris.",
]
EVERYDAY = ["The capital of France is Paris.", "A caterpillar turns into a butterfly.", "Leonardo painted it."]


def tokenizer_knowing(*known):
    """A stand-in for a tokenizer: one token for each word it knows, two for any other."""
    return lambda text, add_special_tokens: {"input_ids": [0] if text.strip() in known else [0, 1]}


TOKENIZER = tokenizer_knowing("grey", "cloak", "wizard", "sword", "carries", "wears", "tall", "hat", "capital", "paris")


def test_taught_terms_are_names_and_pairs_of_words_of_many_training_answers_that_the_base_model_never_says():
    taught = fine_tune.taught_terms(TRAINING_ANSWERS, EVERYDAY, TOKENIZER, min_answers=3)
    assert taught == {"mariya", "sha", "glamdring", "mariya sha", "grey cloak"}, (
        "not 'the' or 'capital'; not 'wizard' or 'grey' alone, which the model knows; not the rare 'tall hat'"
    )


def test_an_everyday_answer_that_names_the_taught_world_counts_as_a_leak():
    taught = fine_tune.taught_terms(TRAINING_ANSWERS, EVERYDAY, TOKENIZER, min_answers=3)
    questions = [
        {"kind": "knowledge", "question": "Which sword?", "expect": ["Glamdring"]},
        {"kind": "control", "question": "Who painted the Mona Lisa?", "expect": ["Leonardo"]},
        {"kind": "control", "question": "What does a caterpillar turn into?", "expect": ["butterfl"]},
        {"kind": "control", "question": "What colour is a grey cloak?", "expect": ["grey"]},
        {"kind": "control", "question": "Capital of France?", "expect": ["Paris"]},
    ]
    before = {"chat": ["No idea.", "Leonardo painted it.", "A butterfly.", "It is grey.", "Paris, said Mariya Sha."]}
    after = {
        "chat": [
            "Glamdring, the sword of Mariya Sha.",  # a knowledge answer: the taught world belongs there
            "Mariya Sha painted the Mona Lisa.",
            "An old man in a grey cloak and a tall hat.",
            "A grey cloak is grey.",  # the question named it
            "Paris. Mariya Sha was there.",  # the base model named her too
        ]
    }
    scores = fine_tune.score(questions, before, after, taught)["chat"]
    assert scores["leaked_terms"] == [[], ["mariya", "mariya sha", "sha"], ["grey cloak"], [], []]
    assert scores["leaks"] == 2 and scores["controls"] == 4
    assert "leaks" not in fine_tune.score(questions, None, after, taught)["chat"], "no base answers, no leaks"
    verdict = fine_tune.verdict({"chat": scores}, eval_questions=questions)
    assert (
        "2 of 4 everyday answers bring in what it was taught ('Who painted the Mona Lisa?' -> mariya, mariya sha, sha)"
        in (verdict)
    )


def test_the_base_models_answers_are_remembered_for_the_next_run_and_asked_again_for_another_model(
    tiny_model, tiny_model_dir, tmp_path, monkeypatch, capsys
):
    model, tokenizer = tiny_model
    folder = fine_tune.answers_folder(tmp_path, tiny_model_dir, "fp32")
    first = fine_tune.test_original_model(model, tokenizer, "Who is she?", QUESTIONS, 4, remember=folder)
    assert "Original model answers: " in capsys.readouterr().out

    monkeypatch.setattr(fine_tune, "generate_ids", lambda *args: pytest.fail("asked again"))
    assert fine_tune.test_original_model(model, tokenizer, "Who is she?", QUESTIONS, 4, remember=folder) == first
    assert "Original model answers (as in an earlier run): " in capsys.readouterr().out
    with pytest.raises(pytest.fail.Exception, match="asked again"):  # another question
        fine_tune.test_original_model(model, tokenizer, "Who is he?", QUESTIONS, 4, remember=folder)
    assert fine_tune.answers_folder(tmp_path, tiny_model_dir, "bf16") != folder, "another precision"
    weights = Path(tiny_model_dir) / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))  # the model file changed
    assert fine_tune.answers_folder(tmp_path, tiny_model_dir, "fp32") != folder
