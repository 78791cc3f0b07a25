"""The shared line-file reader: every JSONL file in the project fails with the same clear messages."""

import pytest

from latentdit.lines import first_line, read_jsonl


def test_reads_objects_with_line_numbers_and_skips_blank_lines(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"a": 1}\n\n  \n{"b": [2]}\n', encoding="utf-8")
    assert read_jsonl(f) == [(1, {"a": 1}), (4, {"b": [2]})]


def test_plain_lines_are_kept_as_text_only_when_asked(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text('a red circle \n{"prompt": "x"}\n', encoding="utf-8")
    assert read_jsonl(f, plain=True) == [(1, "a red circle"), (2, {"prompt": "x"})]
    with pytest.raises(ValueError, match=r"p.txt:1 is not valid JSON"):
        read_jsonl(f)


@pytest.mark.parametrize("content, match", [
    (b'{"a": 1}\n{"a": \n', r"x.jsonl:2 is not valid JSON"),
    (b'{"a": 1}\n[1, 2]\n', r"x.jsonl:2 is a JSON list, not an object"),
    (b'{"a": "\xff"}\n', r"x.jsonl is not UTF-8 text \(byte 7\); it must hold captions"),
])
def test_bad_files_name_the_file_and_line(tmp_path, content, match):
    f = tmp_path / "x.jsonl"
    f.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_jsonl(f, holds="captions")


def test_first_line_of_a_message_or_the_type_name():
    assert first_line(RuntimeError("\n  boom: bad header\n  at offset 3\n")) == "boom: bad header"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(ValueError("   ")) == "ValueError"


def test_read_json_wants_one_object_and_names_what_is_wrong(tmp_path):
    from latentdit.lines import read_json

    f = tmp_path / "c.json"
    f.write_text('{"a": 1,\n "b": [2]}', encoding="utf-8")
    assert read_json(f) == {"a": 1, "b": [2]}
    f.write_text('{"a": 1,\n "b": }')
    with pytest.raises(ValueError, match=r"c.json is not valid JSON \(Expecting value at line 2\)"):
        read_json(f)
    f.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"c.json holds a JSON list, not an object"):
        read_json(f)
    f.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match=r"c.json is not valid JSON \(not UTF-8 at byte 7\)"):
        read_json(f)
    with pytest.raises(ValueError, match=r"missing.json is unreadable"):
        read_json(tmp_path / "missing.json")
