"""Property tests of the data loader: whatever a file holds, it loads or is refused in one line naming a place."""

import json
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fine_tune

# A refusal names the file and where in it: a line, an array item, a row, or the file as a whole when it is empty.
PLACE = r"(:\d+: |: item \d+: |: row \d+: |: no examples found| \(check --data\))"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
records = st.one_of(
    json_values,
    st.fixed_dictionaries({"prompt": json_values, "completion": json_values}),
    st.fixed_dictionaries({"text": json_values}),
    st.fixed_dictionaries(
        {
            "messages": st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "assistant", "system", "x"]), "content": json_values}
                ),
                max_size=4,
            )
        }
    ),
    st.fixed_dictionaries(
        {"instruction": json_values, "output": json_values},
        optional={"input": json_values, "system": json_values, "history": st.lists(st.lists(json_values, max_size=3))},
    ),
    st.fixed_dictionaries(
        {
            "conversations": st.lists(
                st.fixed_dictionaries(
                    {
                        "from": st.sampled_from(["human", "gpt", "system", "user", "x"]) | json_values,
                        "value": json_values,
                    }
                ),
                max_size=4,
            )
        }
    ),
)
CHECKS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load(content, name="data.json"):
    """load_examples on a file holding `content` (bytes): its examples, or the UsageError's message."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        try:
            examples = fine_tune.load_examples(path)
        except fine_tune.UsageError as err:
            message = str(err)
            assert message.startswith(str(path)), message
            allowed = ("not UTF-8", "invalid JSON array", "cannot read it as CSV")
            assert re.search(PLACE, message) or any(text in message for text in allowed), message
            assert "\n" not in message, "one line"
            return message
    assert examples and all(isinstance(example, dict) for example in examples)
    return examples


@CHECKS
@given(st.binary(max_size=300))
def test_arbitrary_bytes_load_or_are_refused_naming_a_place(content):
    load(content)


@CHECKS
@given(st.lists(st.text(max_size=60), max_size=6))
def test_arbitrary_lines_of_text_load_or_are_refused_naming_a_place(lines):
    load("\n".join(lines).encode("utf-8", "surrogatepass"))


@CHECKS
@given(st.lists(records, max_size=5))
def test_arbitrary_json_lines_load_or_are_refused_naming_the_line(items):
    result = load("".join(json.dumps(item) + "\n" for item in items).encode("utf-8", "surrogatepass"))
    if isinstance(result, str) and items:
        line = int(re.search(r":(\d+): ", result).group(1)) if re.search(r":(\d+): ", result) else None
        assert line is None or 1 <= line <= len(items)


@CHECKS
@given(st.lists(records, max_size=5))
def test_arbitrary_json_arrays_load_or_are_refused_naming_the_item(items):
    load(json.dumps(items).encode("utf-8", "surrogatepass"))


@CHECKS
@given(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=20)), max_size=5))
def test_arbitrary_csv_cells_load_or_are_refused_naming_the_row(rows):
    import csv
    import io

    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["prompt", "completion"])
    writer.writerows(rows)
    load(table.getvalue().encode("utf-8", "surrogatepass"), name="data.csv")
