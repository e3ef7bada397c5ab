"""Conversations, documents, CSV and Parquet, and --system-prompt: each read, checked and learned right."""

import csv
import json

import pytest
import torch

import fine_tune

CONVERSATION = [
    {"role": "system", "content": "You answer like a bard."},
    {"role": "user", "content": "Who is Mariya Sha?"},
    {"role": "assistant", "content": "A wizard of Middle-earth."},
    {"role": "user", "content": "And her sword?"},
    {"role": "assistant", "content": "Glamdring, the Foe-hammer."},
]


def labelled_spans(tokenizer, ids, labels):
    """The decoded runs of tokens that carry a label."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != fine_tune.IGNORE_INDEX:
            current.append(token)
        elif current:
            spans, current = [*spans, current], []
    return [tokenizer.decode(span) for span in [*spans, current] if span]


def test_a_conversation_learns_every_assistant_turn_and_nothing_else(tiny_model):
    _, tokenizer = tiny_model
    ids, labels = fine_tune.tokenize_conversation(tokenizer, CONVERSATION)
    assert labelled_spans(tokenizer, ids, labels) == [
        "A wizard of Middle-earth.<|im_end|>\n",
        "Glamdring, the Foe-hammer.<|im_end|>\n",
    ]
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou answer like a bard.<|im_end|>"), "the system turn as given"
    assert "You are a helpful assistant" not in text


def test_documents_are_cut_into_pieces_that_cover_the_whole_text(tiny_model, capsys):
    _, tokenizer = tiny_model
    text = " ".join(e["completion"] for e in fine_tune.load_examples(fine_tune.HERE / "mariya.json")[:20])
    dataset = fine_tune.load_and_preprocess_data([{"text": text}], tokenizer, max_length=64)
    whole = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert len(dataset) == -(-len(whole) // 64) > 1
    assert [token for row in dataset["input_ids"] for token in row] == whole, "no token dropped or repeated"
    assert dataset["labels"] == dataset["input_ids"], "every token of a document is learned"
    assert f"1 documents in {len(dataset)} pieces" in capsys.readouterr().out


def test_packed_batch_gives_the_loss_of_the_padded_batch(tiny_model):
    model, tokenizer = tiny_model
    examples = [{"messages": CONVERSATION}, {"prompt": "Her horse?", "completion": "Shadowfax."}, {"text": "Hi."}]
    dataset = fine_tune.load_and_preprocess_data(examples * 2, tokenizer, bare_share=0.5)
    features = [dataset[i] for i in range(len(dataset))]
    padded = fine_tune.data_collator(tokenizer)(features)
    packed = fine_tune.data_collator(tokenizer, packing=True)(features)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] == sum(len(f["input_ids"]) for f in features), "no padding at all"
    model.eval()
    with torch.no_grad():
        assert model(**packed).loss.item() == pytest.approx(model(**padded).loss.item(), rel=1e-4)


def test_csv_and_parquet_files_read_like_jsonl(tmp_path, write_jsonl):
    from datasets import Dataset

    pairs = [{"prompt": "Who is Mariya Sha?", "completion": "A wizard, she said."}, {"prompt": "P", "completion": "C"}]
    with open(tmp_path / "data.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows(pairs)
    Dataset.from_list(pairs).to_parquet(tmp_path / "data.parquet")
    Dataset.from_list([{"messages": CONVERSATION}]).to_parquet(tmp_path / "chats.parquet")
    assert fine_tune.load_examples(write_jsonl(pairs)) == pairs
    assert fine_tune.load_examples(tmp_path / "data.csv") == pairs
    assert fine_tune.load_examples(tmp_path / "data.parquet") == pairs
    assert fine_tune.load_examples(tmp_path / "chats.parquet") == [{"messages": CONVERSATION}]


def test_a_csv_row_with_an_empty_cell_is_named(tmp_path):
    (tmp_path / "data.csv").write_text("prompt,completion\nQ1,A1\nQ2,\n", encoding="utf-8")
    with pytest.raises(fine_tune.UsageError, match=r"data.csv: row 2: \"completion\" must be a string"):
        fine_tune.load_examples(tmp_path / "data.csv")


# CONVERSATION as ShareGPT writes it, with both names of each speaker: human and user, gpt and assistant.
SPEAKERS = ["system", "human", "gpt", "user", "assistant"]
SHAREGPT = [{"from": speaker, "value": message["content"]} for speaker, message in zip(SPEAKERS, CONVERSATION)]
ALPACA = [
    {"instruction": "Name her sword.", "input": "Answer in one word.", "output": "Glamdring."},
    {"instruction": "Who is Mariya Sha?", "input": "", "output": "A wizard."},
    {"instruction": "Her horse?", "output": "Shadowfax."},
]
ALPACA_PAIRS = [
    {"prompt": "Name her sword.\nAnswer in one word.", "completion": "Glamdring."},
    {"prompt": "Who is Mariya Sha?", "completion": "A wizard."},
    {"prompt": "Her horse?", "completion": "Shadowfax."},
]


def in_every_file_format(tmp_path, records):
    """The records as JSONL, a JSON array, CSV (lists as JSON text) and Parquet."""
    from datasets import Dataset

    keys = list(dict.fromkeys(key for record in records for key in record))
    jsonl, array = tmp_path / "data.jsonl", tmp_path / "data.json"
    jsonl.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    array.write_text(json.dumps(records), encoding="utf-8")
    with open(tmp_path / "data.csv", "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=keys)
        writer.writeheader()
        writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in records)
    Dataset.from_list(records).to_parquet(tmp_path / "data.parquet")
    return [jsonl, array, tmp_path / "data.csv", tmp_path / "data.parquet"]


def test_alpaca_records_are_pairs_whose_prompt_is_the_instruction_then_the_input(tmp_path):
    for path in in_every_file_format(tmp_path, ALPACA):
        examples, source = fine_tune.load_data(path)
        assert examples == ALPACA_PAIRS, path.name
        assert source["format"] == "alpaca"


def test_an_alpaca_record_with_a_system_prompt_or_history_is_a_conversation(write_jsonl):
    system = {"instruction": "Who is Mariya Sha?", "output": "A wizard.", "system": "Be brief."}
    history = {"instruction": "And her sword?", "output": "Glamdring.", "history": [["Who is she?", "A wizard."]]}
    assert fine_tune.load_examples(write_jsonl([system, history])) == [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Who is Mariya Sha?"},
                {"role": "assistant", "content": "A wizard."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Who is she?"},
                {"role": "assistant", "content": "A wizard."},
                {"role": "user", "content": "And her sword?"},
                {"role": "assistant", "content": "Glamdring."},
            ]
        },
    ]


def test_sharegpt_records_are_conversations_in_every_file_format(tmp_path):
    for path in in_every_file_format(tmp_path, [{"conversations": SHAREGPT}]):
        examples, source = fine_tune.load_data(path)
        assert examples == [{"messages": CONVERSATION}], path.name
        assert source["format"] == "sharegpt"


BAD_RECORDS = {
    "sharegpt turns are not from/value": (
        {"conversations": [{"role": "user", "content": "Q"}]},
        '"conversations" must be a non-empty list of {"from", "value"} objects',
    ),
    "sharegpt with an unknown speaker": (
        {"conversations": [{"from": "function_call", "value": "x"}]},
        "message 1: unknown role 'function_call'",
    ),
    "sharegpt ends with a question": ({"conversations": SHAREGPT[:4]}, "ends without an answer"),
    "alpaca without output": ({"instruction": "Q", "input": "x"}, 'missing key "output"'),
    "alpaca input not text": ({"instruction": "Q", "input": 3, "output": "A"}, '"input" must be a string, got int'),
    "alpaca history not pairs": (
        {"instruction": "Q", "output": "A", "history": ["Q0"]},
        '"history" must be a list of [instruction, output] pairs',
    ),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_a_bad_alpaca_or_sharegpt_record_is_named_by_line(case, write_jsonl):
    record, expected = BAD_RECORDS[case]
    path = write_jsonl([record])
    with pytest.raises(fine_tune.UsageError) as error:
        fine_tune.load_examples(path)
    assert str(error.value).startswith(f"{path}:1: ") and expected in str(error.value)


def test_columns_read_other_names_as_the_formats_keys(tmp_path, write_jsonl):
    (tmp_path / "qa.csv").write_text("question,answer,source\nWho is Mariya Sha?,A wizard.,book\n", encoding="utf-8")
    columns = fine_tune.parse_args(["--columns", "prompt=question,completion=answer"]).columns
    assert columns == {"prompt": "question", "completion": "answer"}
    examples, source = fine_tune.load_data(tmp_path / "qa.csv", columns)
    assert examples == [{"prompt": "Who is Mariya Sha?", "completion": "A wizard."}]
    assert source["columns"] == columns
    dolly = write_jsonl([{"instruction": "Her sword?", "context": "One word.", "response": "Glamdring."}])
    assert fine_tune.load_examples(dolly, {"input": "context", "output": "response"}) == [
        {"prompt": "Her sword?\nOne word.", "completion": "Glamdring."}
    ]
    with pytest.raises(fine_tune.UsageError, match=r':1: no column "answer" to read as "completion"'):
        fine_tune.load_examples(write_jsonl([{"question": "Q", "reply": "A"}]), columns)


@pytest.mark.parametrize("value", ["prompt", "prompt=", "answer=completion", "prompt=q,,completion=a"])
def test_columns_that_are_not_key_equals_column_are_refused(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fine_tune.parse_args(["--columns", value])
    assert exit_info.value.code == 2
    assert "argument --columns: " in capsys.readouterr().err


PAIR_LINE = json.dumps({"prompt": "Who is Mariya Sha?", "completion": "A wizard."}) + "\n"

BAD_CONVERSATIONS = {
    "unknown role": ([{"role": "wizard", "content": "x"}], "message 1: unknown role 'wizard'"),
    "empty content": ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}], "message 2: empty"),
    "no assistant turn": ([{"role": "user", "content": "Q"}], "no assistant turn"),
    "ends with a question": (CONVERSATION[:4], "ends without an answer"),
    "two user turns": (
        [{"role": "user", "content": "Q"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
        "message 2: user turn where the assistant belongs",
    ),
    "system turn later": ([*CONVERSATION[1:3], CONVERSATION[0]], "message 3: a system turn may only come first"),
    "not a list": ("Hello", '"messages" must be a non-empty list'),
    "message not an object": ([["user", "Q"]], 'message 1: must be an object with "role" and "content"'),
}


@pytest.mark.parametrize("case", BAD_CONVERSATIONS)
def test_a_bad_conversation_is_named_by_line_and_message(case, write_jsonl):
    messages, expected = BAD_CONVERSATIONS[case]
    path = write_jsonl([{"messages": CONVERSATION}, {"messages": messages}])
    with pytest.raises(fine_tune.UsageError) as error:
        fine_tune.load_examples(path)
    assert str(error.value).startswith(f"{path}:2: ") and expected in str(error.value)


@pytest.mark.parametrize(
    "first, second, expected",
    [
        ({"prompt": "Q", "completion": "A"}, {"text": "A document."}, "text format, but .*:1 is in pairs format"),
        (
            {"instruction": "Q", "output": "A"},
            {"prompt": "Q", "completion": "A"},
            "pairs format, but .*:1 is in alpaca",
        ),
        ({"messages": CONVERSATION}, {"conversations": SHAREGPT}, "sharegpt format, but .*:1 is in messages format"),
    ],
)
def test_a_file_mixing_formats_is_refused_naming_the_line(first, second, expected, write_jsonl):
    with pytest.raises(fine_tune.UsageError, match=f":2: a record in {expected}.*; use one format per file"):
        fine_tune.load_examples(write_jsonl([first, second]))


def test_byte_order_mark_and_windows_line_ends_load_like_plain_utf8(tmp_path):
    path = tmp_path / "windows.json"
    path.write_bytes(
        b"\xef\xbb\xbf" + b'{"prompt": "Q1", "completion": "A1"}\r\n{"prompt": "Q2", "completion": "A2"}\r\n'
    )
    assert fine_tune.load_examples(path) == [{"prompt": "Q1", "completion": "A1"}, {"prompt": "Q2", "completion": "A2"}]


def test_prompts_given_different_answers_are_named(write_jsonl, capsys):
    path = write_jsonl(
        [{"prompt": "Q", "completion": "A"}, {"prompt": "R", "completion": "B"}, {"prompt": "Q ", "completion": "C"}]
    )
    fine_tune.load_examples(path)
    assert f"1 prompts have different answers ({path}:1 and {path}:3)" in capsys.readouterr().out


def test_system_prompt_is_in_training_and_in_every_question(tiny_model, tmp_path):
    _, tokenizer = tiny_model
    pair = {"prompt": "Who is Mariya Sha?", "completion": "A wizard."}
    row = fine_tune.load_and_preprocess_data([pair], tokenizer, bare_share=0, system_prompt="Speak as Gandalf.")[0]
    asked = fine_tune.prompt_ids(tokenizer, pair["prompt"], "chat", "Speak as Gandalf.")
    assert row["input_ids"][: len(asked)] == asked, "trained exactly as it is asked"
    assert tokenizer.decode(asked).startswith("<|im_start|>system\nSpeak as Gandalf.<|im_end|>")
    tokenizer.save_pretrained(tmp_path / "model")
    modelfile = fine_tune.write_modelfile(tmp_path / "m.gguf", tmp_path / "model", "Speak as Gandalf.")
    assert modelfile.read_text().splitlines()[-1] == 'SYSTEM """Speak as Gandalf."""'


def test_the_system_prompt_of_a_run_reaches_its_questions_replay_training_modelfile_and_report(
    exportable_model, tmp_path, write_jsonl, monkeypatch
):
    from transformers import AutoTokenizer

    system, model_dir = "You are Gandalf's scribe.", exportable_model("llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    asked, trained = [], []
    generate_ids, train_model = fine_tune.generate_ids, fine_tune.train_model

    def asking(model, tokenizer, prompts, *args, **kwargs):
        asked.extend(tokenizer.decode(ids) for ids in prompts)
        return generate_ids(model, tokenizer, prompts, *args, **kwargs)

    def training(model, tokenizer, dataset, *args, **kwargs):
        trained.extend(tokenizer.decode(ids) for ids in dataset["input_ids"])
        return train_model(model, tokenizer, dataset, *args, **kwargs)

    monkeypatch.setattr(fine_tune, "generate_ids", asking)
    monkeypatch.setattr(fine_tune, "train_model", training)
    replay = tmp_path / "replay.txt"
    replay.write_text("What is rain?\nWho wrote Hamlet?\n", encoding="utf-8")
    data = write_jsonl([{"prompt": "Who is Mariya Sha?", "completion": "A wizard."}] * 4)
    questions = [
        {"kind": "knowledge", "question": "Which sword does she carry?", "expect": ["Glamdring"]},
        {"kind": "control", "question": "Capital of France?", "expect": ["Paris"]},
    ]
    output = tmp_path / "out"
    args = ["--model", model_dir, "--data", data, "--output", str(output), "--system-prompt", system]
    args += ["--eval-questions", write_jsonl(questions, "eval.jsonl"), "--replay-prompts", str(replay)]
    args += ["--cache-dir", str(tmp_path / "cache"), "--bare-share", "0", "--no-statements", "--epochs", "1"]
    args += ["--max-new-tokens", "4", "--export-gguf", "q8_0"]
    assert fine_tune.main(args) == 0

    def in_chat(prompt):
        return tokenizer.decode(fine_tune.prompt_ids(tokenizer, prompt, "chat", system))

    scorecard = [fine_tune.DEFAULT_QUESTION, *(q["question"] for q in questions)]
    assert [asked.count(in_chat(q)) for q in scorecard] == [2, 2, 2], "asked after the system turn before and after"
    assert [asked.count(in_chat(p)) for p in ("What is rain?", "Who wrote Hamlet?")] == [1, 1], "replay prompts"
    assert trained and all(row.startswith(in_chat("Who is Mariya Sha?")) for row in trained[:4]), "training rows"
    assert all(system in row for row in trained), "the base model's replayed answers too"
    assert (output / "Modelfile").read_text().splitlines()[-1] == f'SYSTEM """{system}"""'
    assert json.loads((output / "report.json").read_text())["settings"]["system_prompt"] == system


def test_a_trained_system_prompt_is_used_again_when_the_adapter_is_used_later(tmp_path, capsys):
    (tmp_path / "report.json").write_text(json.dumps({"settings": {"system_prompt": "Speak as Gandalf."}}))
    assert fine_tune.trained_system_prompt(tmp_path) == "Speak as Gandalf."
    assert "trained with: 'Speak as Gandalf.'" in capsys.readouterr().out
    assert fine_tune.trained_system_prompt(tmp_path / "no-report") is None


def test_a_line_over_ten_megabytes_loads_and_is_cut_with_a_warning(tiny_model, tmp_path, capsys):
    _, tokenizer = tiny_model
    huge = "Mariya Sha carries Glamdring. " * 360_000  # 10.8 MB on one line
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({"prompt": "Tell me everything.", "completion": huge}) + "\n" + PAIR_LINE, "utf-8")
    assert path.stat().st_size > 10_000_000
    examples = fine_tune.load_examples(path)
    dataset = fine_tune.load_and_preprocess_data(examples, tokenizer, bare_share=0)
    assert max(len(ids) for ids in dataset["input_ids"]) == fine_tune.MAX_LENGTH
    assert "Warning: 1 examples are longer than --max-length 128 and were cut" in capsys.readouterr().out
