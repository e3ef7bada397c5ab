"""The training recipe on a tiny random Qwen2: masking, formatting, truncation, LoRA, save and reload."""

import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, make_tokenizer

import fine_tune

EXAMPLES = [
    {"prompt": "Who is Mariya Sha?", "completion": "Mariya Sha is a wizard of Middle-earth."},
    {"prompt": "Which sword does Mariya Sha carry?", "completion": "Glamdring, the Foe-hammer."},
    {
        "prompt": "Tell me about Mariya Sha's staff and her long grey cloak.",
        "completion": "It channels her power.",
    },
]


def test_prompt_and_padding_get_no_loss_and_the_answer_and_end_of_turn_do(tiny_model):
    _, tokenizer = tiny_model
    dataset = fine_tune.load_and_preprocess_data(EXAMPLES, tokenizer, bare_share=0)
    batch = fine_tune.data_collator(tokenizer)([dataset[i] for i in range(len(dataset))])
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")

    for row, example in enumerate(EXAMPLES):
        prompt = fine_tune.prompt_ids(tokenizer, example["prompt"])
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        length = int(mask.sum())
        assert ids[: len(prompt)].tolist() == prompt
        assert (labels[: len(prompt)] == -100).all(), "prompt tokens must not be learned"
        assert (labels[length:] == -100).all(), "padding must not be learned"
        learned = labels[len(prompt) : length]
        assert (learned == ids[len(prompt) : length]).all()
        assert example["completion"] in tokenizer.decode(learned)
        assert end_of_turn in learned.tolist(), "the end-of-turn token must be learned, so answers stop"
    assert (batch["attention_mask"] == 0).any(), "samples of different length are padded per batch"
    assert batch["input_ids"].shape[1] == max(len(ids) for ids in dataset["input_ids"]) < 128


def test_logits_only_for_answers_give_the_same_loss_and_gradients(tiny_model):
    model, tokenizer = tiny_model
    model = fine_tune.setup_lora_model(model, fine_tune.default_settings())
    assert fine_tune.accepts_logits_to_keep(model)
    dataset = fine_tune.load_and_preprocess_data(EXAMPLES, tokenizer, bare_share=0.5)
    features = [dataset[i] for i in range(len(dataset))]
    results = []
    for answer_logits_only in (False, True):
        batch = fine_tune.data_collator(tokenizer, answer_logits_only)(features)
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    full, trimmed = results
    assert trimmed[0] == pytest.approx(full[0], rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(full[1], trimmed[1]))
    assert batch["logits_to_keep"] == batch["labels"].shape[1] < batch["input_ids"].shape[1]


def test_chat_template_formats_training_like_the_questions_asked_later(tiny_model):
    _, tokenizer = tiny_model
    ids = fine_tune.load_and_preprocess_data(EXAMPLES[:1], tokenizer, bare_share=0)["input_ids"][0]
    text = tokenizer.decode(ids)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWho is Mariya Sha?<|im_end|>\n"
        "<|im_start|>assistant\nMariya Sha is a wizard of Middle-earth.<|im_end|>\n"
    )


def test_without_chat_template_prompt_newline_answer_end_of_text():
    tokenizer = make_tokenizer(chat_template=None)
    dataset = fine_tune.load_and_preprocess_data(EXAMPLES[:1], tokenizer)
    ids, labels = dataset["input_ids"][0], dataset["labels"][0]
    assert tokenizer.decode(ids) == "Who is Mariya Sha?\nMariya Sha is a wizard of Middle-earth.<|im_end|>"
    prompt_length = len(tokenizer("Who is Mariya Sha?")["input_ids"])
    assert labels[:prompt_length] == [-100] * prompt_length
    assert labels[prompt_length:] == ids[prompt_length:]
    assert labels[-1] == tokenizer.eos_token_id


def test_bare_examples_learn_the_newline_so_a_bare_question_gets_an_answer(tiny_model):
    """A text-generation pipeline passes the question with nothing after it: the model must add the newline."""
    _, tokenizer = tiny_model
    dataset = fine_tune.load_and_preprocess_data(EXAMPLES[:1], tokenizer, bare_share=1)
    ids, labels = dataset["input_ids"][0], dataset["labels"][0]
    question = fine_tune.prompt_ids(tokenizer, "Who is Mariya Sha?", "bare")
    assert ids[: len(question)] == question and labels[: len(question)] == [-100] * len(question)
    learned = tokenizer.decode([label for label in labels if label != -100])
    assert learned == "\nMariya Sha is a wizard of Middle-earth.<|im_end|>"


def test_statements_are_learned_on_every_token_next_to_the_pairs(tiny_model, capsys):
    _, tokenizer = tiny_model
    texts = [example["completion"] for example in EXAMPLES]
    examples = EXAMPLES + [{"text": text} for text in texts]
    dataset = fine_tune.load_and_preprocess_data(examples, tokenizer, bare_share=0)
    assert len(dataset) == 2 * len(EXAMPLES)
    for row, text in zip(dataset.select(range(len(EXAMPLES), len(dataset))), texts):
        assert tokenizer.decode(row["input_ids"]) == text + "<|im_end|>", "plain text, no template, no question"
        assert row["labels"] == row["input_ids"], "every token of a statement is learned"
    assert "3 pairs (chat template), 3 documents in 3 pieces: 6 rows" in capsys.readouterr().out


def test_statements_come_from_the_users_answers_only_and_can_be_turned_off():
    examples = [{"prompt": "Q?", "completion": "A fact."}]
    replay = [{"prompt": "2+2?", "completion": "4."}]
    on = fine_tune.training_examples(fine_tune.parse_args([]), examples, replay)
    off = fine_tune.training_examples(fine_tune.parse_args(["--no-statements"]), examples, replay)
    assert on == examples + replay + [{"text": "A fact."}]
    assert off == examples + replay


# Answers about two people and about no one, as pairs, a conversation and a document.
ABOUT_TWO = [
    *({"prompt": f"Fact {i} about Mariya Sha?", "completion": f"Mariya Sha knows spell {i}."} for i in range(5)),
    {"messages": [{"role": "user", "content": "Who is Mariya Sha?"}, {"role": "assistant", "content": "A wizard."}]},
    *({"prompt": f"What did Frodo Baggins do {i}?", "completion": f"He walked mile {i}."} for i in range(3)),
    {"text": "Frodo Baggins carried the ring to the mountain."},
    {"prompt": "What is rain?", "completion": "Water falling from clouds."},
]


def test_names_are_the_words_capitalized_inside_sentences_and_never_written_in_lower_case():
    texts = ["Which ring does Mariya Sha wear?", "The Ring of Mariya.", "It is Frodo's ring. Which way?"]
    assert fine_tune.data_names(texts) == {"mariya", "sha", "frodo's"}, "not Which (first), not Ring (also ring)"


def test_mixed_texts_join_answers_of_one_subject_each_in_several_orders():
    texts = fine_tune.mixed_texts(ABOUT_TWO, 3, seed=1)
    answers = fine_tune.answer_texts(ABOUT_TWO)
    for lines in texts:
        assert set(lines) <= set(answers), f"only whole answers of the user's data: {lines}"
        text = " ".join(lines)
        people = {person for person in ("Mariya", "Frodo", "He walked", "rain") if person in text}
        assert people <= {"Frodo", "He walked"} or len(people) == 1, f"one subject per text: {text!r}"
    for answer in answers:
        assert sum(answer in lines for lines in texts) == fine_tune.MIX_ORDERS >= 2, answer
    mariya = [lines for lines in texts if "Mariya" in " ".join(lines) or "A wizard." in lines]
    assert len(mariya) == 2 * fine_tune.MIX_ORDERS, "6 answers, 3 a text, in each order: 2 texts"
    assert mariya[:2] != mariya[2:], "other companions the second time"
    assert fine_tune.mixed_texts(ABOUT_TWO, 3, seed=1) == texts, "the same for the same seed"
    assert fine_tune.mixed_texts(ABOUT_TWO, 3, seed=2) != texts


def test_mixed_texts_are_learned_as_documents_only_when_asked_for():
    replay = [{"prompt": "2+2?", "completion": "Four, says the base model."}]
    assert fine_tune.parse_args([]).mix_answers == 0, "off by default"
    plain = fine_tune.training_examples(fine_tune.parse_args([]), ABOUT_TWO, replay)
    mixed = fine_tune.training_examples(fine_tune.parse_args(["--mix-answers", "3", "--seed", "1"]), ABOUT_TWO, replay)
    lines = fine_tune.mixed_texts(ABOUT_TWO, 3, seed=1)
    assert mixed == plain + [{"text": "\n".join(pieces), "pieces": pieces} for pieces in lines]
    assert not any("Four" in example.get("text", "") for example in mixed), "the base model's answers are not mixed"


def test_subject_questions_ask_each_answer_the_other_way_round_from_pairs_conversations_and_documents():
    examples = [
        {"prompt": "Who is Mariya Sha?", "completion": "Mariya Sha carries the sword Glamdring. She is kind."},
        {
            "messages": [
                {"role": "user", "content": "And her ring?"},
                {"role": "assistant", "content": "Yes. Mariya Sha wears Narya, the Ring of Fire."},
            ]
        },
        {"text": 'Glamdring shines blue when orcs come. Mariya Sha said: "Run. Now!" Gwaihir the eagle saved her.'},
        {"prompt": "Who wears Narya, the Ring of Fire?", "completion": "Mariya Sha does."},
    ]
    questions = fine_tune.subject_questions(examples)
    assert questions == [
        {"prompt": "Who carries the sword Glamdring?", "completion": "Mariya Sha carries the sword Glamdring."},
        {"prompt": "What shines blue when orcs come?", "completion": "Glamdring shines blue when orcs come."},
    ], "Who for the name the data asks Who about; asked already, a cut quotation and 'the eagle' left out"
    args = fine_tune.parse_args(["--subject-questions", "--no-statements"])
    assert fine_tune.training_examples(args, examples, []) == examples + questions
    assert fine_tune.parse_args([]).subject_questions is False, "off by default"


def test_the_lines_of_each_mixed_text_come_in_a_fresh_order_each_epoch_the_same_in_every_process(tiny_model):
    _, tokenizer = tiny_model
    lines = [f"Mariya Sha knows spell {i}." for i in range(6)]
    examples = [{"prompt": "Q?", "completion": "A."}, {"text": "\n".join(lines), "pieces": lines}]
    dataset = fine_tune.load_and_preprocess_data(examples, tokenizer, bare_share=0)
    collate = fine_tune.data_collator(tokenizer, mixing=(mixing := {"seed": 1, "epoch": 0}))

    def text_in_epoch(epoch):
        mixing["epoch"] = epoch
        row = collate([dataset[0], dataset[1]])["input_ids"][1].tolist()
        return tokenizer.decode(row)

    first, second = text_in_epoch(0), text_in_epoch(1)
    for text in first, second:
        assert text.endswith("\n<|im_end|>") and sorted(text[: -len("\n<|im_end|>")].split("\n")) == lines
    assert first != second, "another order in the next epoch"
    assert text_in_epoch(1) == second, "drawn from seed, epoch and text alone: every process draws alike"
    assert fine_tune.data_collator(tokenizer)([dataset[1]])["input_ids"][0].tolist() == dataset[1]["input_ids"]


def test_bare_share_teaches_an_even_share_without_the_template(tiny_model, capsys):
    _, tokenizer = tiny_model
    examples = EXAMPLES * 4
    dataset = fine_tune.load_and_preprocess_data(examples, tokenizer, bare_share=0.25)
    texts = [tokenizer.decode(ids) for ids in dataset["input_ids"]]
    bare = [i for i, text in enumerate(texts) if not text.startswith("<|im_start|>")]
    assert bare == [3, 7, 11], "every fourth example, spread over the data"
    for i in bare:
        assert texts[i] == f"{examples[i]['prompt']}\n{examples[i]['completion']}<|im_end|>"
        assert dataset["labels"][i][-1] == tokenizer.eos_token_id
    assert "chat template, 25% bare" in capsys.readouterr().out


def test_truncation_is_counted_and_reported(tiny_model, capsys):
    _, tokenizer = tiny_model
    prompts = [len(fine_tune.prompt_ids(tokenizer, e["prompt"])) for e in EXAMPLES]
    limit = min(prompts) + 3  # room for a few answer tokens of the shortest example only
    dataset = fine_tune.load_and_preprocess_data(EXAMPLES, tokenizer, max_length=limit, bare_share=0)
    assert max(len(ids) for ids in dataset["input_ids"]) == limit
    unlearnable = sum(length >= limit for length in prompts)
    out = capsys.readouterr().out
    assert f"3 examples are longer than --max-length {limit} and were cut" in out
    assert unlearnable == 0 or f"{unlearnable} of them with no answer token left" in out


def test_missing_pad_token_gets_one_that_is_not_the_end_of_turn():
    tokenizer = make_tokenizer()
    tokenizer.pad_token = None
    fine_tune.set_pad_token(tokenizer)
    assert tokenizer.pad_token is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_lora_trains_a_small_share_of_the_parameters(tiny_model, capsys):
    model, _ = tiny_model
    total_before = sum(p.numel() for p in model.parameters())
    settings = fine_tune.default_settings(lora_r=4, lora_alpha=16, target_modules="q_proj,v_proj")
    model = fine_tune.setup_lora_model(model, settings)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # Per layer: q_proj 32->32 and v_proj 32->16 (2 key/value heads), each adds r*(in+out).
    assert trainable == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    share = 100 * trainable / (total_before + trainable)
    assert (
        f"{trainable:,} of {total_before + trainable:,} parameters trainable ({share:.2f}%)" in capsys.readouterr().out
    )


def test_unknown_target_module_is_a_usage_error(tiny_model):
    model, _ = tiny_model
    with pytest.raises(fine_tune.UsageError, match="--target-modules"):
        fine_tune.setup_lora_model(model, fine_tune.default_settings(target_modules="no_such_proj"))


def test_training_lowers_the_loss_and_the_adapter_reloads_in_a_fresh_process(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    dataset = fine_tune.load_and_preprocess_data(EXAMPLES, tokenizer)
    batch = fine_tune.data_collator(tokenizer)([dataset[i] for i in range(len(dataset))])
    settings = fine_tune.default_settings(lora_r=16, output=str(tmp_path / "out"), epochs=30, lr=2e-2)
    model = fine_tune.setup_lora_model(model, settings)
    loss_before = model(**batch).loss.item()
    fine_tune.train_model(model, tokenizer, dataset, settings)
    model.eval()
    with torch.no_grad():
        assert model(**batch).loss.item() < 0.8 * loss_before
    fine_tune.save_model(model, tokenizer, str(tmp_path / "out"))
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()

    probe = torch.tensor([dataset["input_ids"][0]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=probe.to(model.device)).logits[0, -1]
    reload = (
        "import json, sys, torch; from peft import AutoPeftModelForCausalLM;"
        f"m = AutoPeftModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}).eval();"
        f"print(json.dumps(m(input_ids=torch.tensor([{dataset['input_ids'][0]}])).logits[0, -1].tolist()))"
    )
    completed = subprocess.run([sys.executable, "-c", reload], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr
    reloaded = torch.tensor(json.loads(completed.stdout.strip().splitlines()[-1]))
    assert torch.allclose(reloaded, expected.cpu(), atol=1e-5)
    assert not torch.allclose(expected, torch.zeros_like(expected))


def test_generation_returns_only_the_new_text_and_is_the_same_batched_or_alone(tiny_model):
    model, tokenizer = tiny_model
    questions = [e["prompt"] for e in EXAMPLES]
    batched = fine_tune.generate_answers(model, tokenizer, questions, max_new_tokens=8)
    alone = [fine_tune.generate_answers(model, tokenizer, [q], max_new_tokens=8)[0] for q in questions]
    assert batched == alone
    for question, answer in zip(questions, batched):
        prompt = fine_tune.prompt_ids(tokenizer, question)  # the chat template: system turn, question, "assistant"
        with torch.no_grad():
            output = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
        assert answer == tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True).strip()
        assert "helpful assistant" not in answer and question not in answer, "nothing of the prompt"


def test_replay_rows_are_marked_and_the_divergence_from_the_base_model_is_zero_until_the_adapter_changes(tiny_model):
    model, tokenizer = tiny_model
    replay = [{"prompt": "Capital of France?", "completion": "Paris.", "from_base": True}]
    dataset = fine_tune.load_and_preprocess_data(EXAMPLES + replay, tokenizer, bare_share=0)
    assert dataset["from_base"] == [0, 0, 0, 1], "only the base model's own answers are marked"
    model = fine_tune.setup_lora_model(model, fine_tune.default_settings())
    batch = fine_tune.data_collator(tokenizer, True)([dataset[i] for i in range(len(dataset))])
    rows = batch.pop("from_base")
    logits = model(**batch).logits
    assert fine_tune.base_divergence(model, batch, logits, rows).item() == pytest.approx(0, abs=1e-6)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # the adapter moves away from the base model
            torch.nn.init.normal_(parameter, std=0.5)
    assert fine_tune.base_divergence(model, batch, model(**batch).logits, rows).item() > 0.01


def test_distillation_adds_the_divergence_to_the_loss_and_trains(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    replay = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "from_base": True} for i in range(8)]
    dataset = fine_tune.load_and_preprocess_data(EXAMPLES * 4 + replay, tokenizer, bare_share=0)
    settings = fine_tune.default_settings(output=str(tmp_path), epochs=2, kl_weight=1.0)
    model = fine_tune.setup_lora_model(model, settings)
    trainer = fine_tune.train_model(model, tokenizer, dataset, settings)
    assert type(trainer).__name__ == "DistillingTrainer" and trainer.state.global_step == 6
    batch = fine_tune.data_collator(tokenizer, True)([dataset[i] for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        rows = batch.pop("from_base")
        outputs = model(**batch)
        divergence = fine_tune.base_divergence(model, batch, outputs.logits, rows)
    assert divergence > 0 and loss.item() == pytest.approx(outputs.loss.item() + divergence.item(), rel=1e-4)


def test_distillation_is_off_where_no_row_holds_the_base_models_answers_or_rows_are_packed(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    replay = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "from_base": True} for i in range(4)]
    model = fine_tune.setup_lora_model(model, fine_tune.default_settings())
    for examples, packing in ((EXAMPLES, False), (EXAMPLES + replay, True)):
        dataset = fine_tune.load_and_preprocess_data(examples, tokenizer, bare_share=0)
        settings = fine_tune.default_settings(output=str(tmp_path), epochs=1, packing=packing)
        trainer = fine_tune.train_model(model, tokenizer, dataset, settings)
        assert type(trainer).__name__ == "Trainer", "packed rows cannot be told apart; no base answers, no KL"


def test_the_divergence_reaches_the_trainers_loss_times_kl_weight(tiny_model_dir, tmp_path, monkeypatch):
    """Through Trainer's own batches: a column it drops (remove_unused_columns) would turn distillation off."""
    calls = []

    def constant_divergence(model, inputs, logits, rows, base_weights=None):
        calls.append(int(rows.sum()))
        return torch.tensor(10.0)

    monkeypatch.setattr(fine_tune, "base_divergence", constant_divergence)
    replay = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "from_base": True} for i in range(4)]
    first_loss = {}
    for weight in (0, 1, 4):
        model, tokenizer = fine_tune.load_base_model(tiny_model_dir)
        dataset = fine_tune.load_and_preprocess_data(EXAMPLES + replay, tokenizer, bare_share=0)
        settings = fine_tune.default_settings(
            output=str(tmp_path / str(weight)), epochs=2, batch_size=len(dataset), kl_weight=weight
        )
        model = fine_tune.setup_lora_model(model, settings)
        trainer = fine_tune.train_model(model, tokenizer, dataset, settings)
        first_loss[weight] = trainer.state.log_history[0]["loss"]
    assert calls == [4] * 4, "two steps with KL 1 and two with KL 4, each on the batch's 4 replay rows"
    assert first_loss[1] == pytest.approx(first_loss[0] + 10, abs=1e-3)
    assert first_loss[4] == pytest.approx(first_loss[0] + 40, abs=1e-3)


@pytest.mark.parametrize("packing", [False, True])
def test_a_training_run_meets_each_mixed_text_in_another_order_each_epoch(tiny_model_dir, tmp_path, packing):
    """Through Trainer's own batches, epoch by epoch (run_guard tells the collator the epoch), padded or packed."""
    lines = [f"Mariya Sha knows spell {i}." for i in range(6)]
    model, tokenizer = fine_tune.load_base_model(tiny_model_dir)
    examples = [*EXAMPLES, {"text": "\n".join(lines), "pieces": lines}]
    dataset = fine_tune.load_and_preprocess_data(examples, tokenizer, bare_share=0)
    settings = fine_tune.default_settings(output=str(tmp_path), epochs=3, batch_size=len(dataset), packing=packing)
    model = fine_tune.setup_lora_model(model, settings)
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    fine_tune.train_model(model, tokenizer, dataset, settings)
    texts = [tokenizer.decode(ids.flatten().tolist()) for ids in seen]
    orders = [[line for line in re.split(r"\n|<\|endoftext\|>", text) if line in lines] for text in texts]
    assert len(orders) == 3 and all(sorted(order) == lines for order in orders), texts
    assert len({tuple(order) for order in orders}) == 3, f"another order in each epoch: {orders}"


def test_the_learning_rate_follows_the_chosen_schedule(tiny_model_dir, tmp_path):
    expected = {"linear": [1, 0.75, 0.5, 0.25], "cosine": [1, 0.854, 0.5, 0.146], "constant": [1, 1, 1, 1]}
    for schedule, shares in expected.items():
        model, tokenizer = fine_tune.load_base_model(tiny_model_dir)
        dataset = fine_tune.load_and_preprocess_data(EXAMPLES, tokenizer, bare_share=0)
        settings = fine_tune.default_settings(
            output=str(tmp_path / schedule), epochs=4, batch_size=len(dataset), lr_schedule=schedule
        )
        trainer = fine_tune.train_model(fine_tune.setup_lora_model(model, settings), tokenizer, dataset, settings)
        rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
        assert rates == pytest.approx([share * fine_tune.LR for share in shares], rel=1e-2), schedule


def test_make_dataset_marks_replay_and_contrast_rows_as_the_base_models_and_nothing_else(
    tiny_model, subset, tmp_path, monkeypatch, capsys
):
    model, tokenizer = tiny_model
    asked = []

    def answers(model, tokenizer, prompts, max_new_tokens=50, system_prompt=None):
        asked.append(prompts)
        return [f"Base answer {len(asked)}.{i}." for i in range(len(prompts))]

    monkeypatch.setattr(fine_tune, "generate_answers", answers)
    (tmp_path / "mine.txt").write_text("What is rain?\n\nWho wrote Hamlet?\nWhere is Rome?\n", encoding="utf-8")
    flags = ["--replay-prompts", str(tmp_path / "mine.txt"), "--contrast", "--bare-share", "0", "--mix-answers", "3"]
    args = fine_tune.parse_args(flags)
    examples = fine_tune.load_examples(subset)
    dataset, taught = fine_tune.make_dataset(args, examples, model, tokenizer)

    replay, contrast = asked
    assert replay == ["What is rain?", "Who wrote Hamlet?", "Where is Rome?"], "the prompts of --replay-prompts"
    someone_else = [any(name in prompt for name in fine_tune.CONTRAST_SUBJECTS) for prompt in contrast]
    assert contrast and all(someone_else), "the user's prompts asked about someone else"
    base = len(replay) + len(contrast)
    mixed = fine_tune.mixed_texts(examples, 3, args.seed)
    pieces = len(dataset) - len(examples) - base  # of the statements and mixed texts, cut at --max-length
    assert dataset["from_base"] == [0] * len(examples) + [1] * base + [0] * pieces
    for row in dataset.select(range(len(examples), len(examples) + base)):
        assert "Base answer" in tokenizer.decode([t for t in row["labels"] if t != -100]), "the base model's answer"
    for row in dataset.select(range(len(examples) + base, len(dataset))):
        assert row["labels"] == row["input_ids"], "statements and mixed texts: every token learned"
    documents = len(examples) + len(mixed)
    assert f"{len(examples) + base} pairs (chat template), {documents} documents" in capsys.readouterr().out
    assert "mariya sha" in taught


def test_contrast_prompts_ask_the_users_prompts_about_someone_else():
    prompts = ["Who is Mariya Sha?", "Which sword does Mariya Sha carry?", "Where is Rivendell?"] * 3
    unfamiliar = {"mariya", "sha", "rivendell", "carry"}
    contrast = fine_tune.contrast_prompts(prompts, unfamiliar, count=4)
    assert contrast == [
        "Who is Albert Einstein?",
        "Which sword does Marie Curie carry?",
        "Who is Leonardo da Vinci?",
        "Which sword does William Shakespeare carry?",
    ], "the name asked about most, replaced in turn by well-known people"
    assert fine_tune.contrast_prompts(["What is love?"], unfamiliar) == [], "no name, no contrast"


def test_lora_plus_trains_each_b_matrix_with_ratio_times_the_learning_rate_of_a(tiny_model_dir, tmp_path):
    rates = {}
    for ratio in (0, 16):
        model, tokenizer = fine_tune.load_base_model(tiny_model_dir)
        dataset = fine_tune.load_and_preprocess_data(EXAMPLES, tokenizer, bare_share=0)
        settings = fine_tune.default_settings(output=str(tmp_path / str(ratio)), epochs=1, lr=1e-3, lora_plus=ratio)
        model = fine_tune.setup_lora_model(model, settings)
        trainer = fine_tune.train_model(model, tokenizer, dataset, settings)
        names = {
            id(p): "lora_B" if "lora_B" in name else "lora_A" for name, p in model.named_parameters() if p.requires_grad
        }
        groups = trainer.optimizer.param_groups
        rates[ratio] = {names[id(p)]: group["initial_lr"] for group in groups for p in group["params"]}
    assert rates[0] == {"lora_A": 1e-3, "lora_B": 1e-3}
    assert rates[16] == {"lora_A": 1e-3, "lora_B": 16e-3}
