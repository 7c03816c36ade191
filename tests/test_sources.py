"""Record sources: local JSON / JSON Lines / Parquet files, a hub-style dataset folder, TFDS.

Expected records come from json / pyarrow directly, not from the code under test. Nothing here
touches the network: the hub path is exercised with a local dataset folder (the same
``datasets.load_dataset(name, ...)`` call) and a stub, TFDS with a tiny builder prepared in a
temporary data_dir (array_record, no TensorFlow).
"""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from tr_align.data import formats, sources
from tr_align.data.sources import DataError, load_records

FIXTURES = REPO / "tests" / "fixtures" / "data"


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Keep the datasets cache (arrow files written by load_dataset) inside tmp_path."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def json_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_jsonl_records_and_file_line_origins():
    path = FIXTURES / "hh.jsonl"
    got = load_records("files", str(path))
    assert [r for r, _ in got] == json_lines(path)
    assert [o for _, o in got] == [f"{path}:{n}" for n in range(1, 9)]


def test_jsonl_nested_records_keep_their_shape():
    path = FIXTURES / "tldr.jsonl"
    got = load_records("files", str(path))
    want = json_lines(path)
    for (record, _), expected in zip(got, want, strict=True):
        assert record["info"] == expected["info"]
        assert record["summaries"] == expected["summaries"]
        assert record["choice"] == expected["choice"]


def test_blank_lines_are_skipped_and_line_numbers_stay_right(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n   \n{"a": 3}\n')
    got = load_records("files", str(path))
    assert got == [({"a": 1}, f"{path}:1"), ({"a": 2}, f"{path}:3"), ({"a": 3}, f"{path}:5")]


def test_json_array_rows():
    path = FIXTURES / "generic.json"
    got = load_records("files", str(path))
    assert [r for r, _ in got] == json.loads(path.read_text())
    assert [o for _, o in got] == [f"{path} row {i}" for i in range(4)]


def test_json_extension_holding_json_lines(tmp_path):
    path = tmp_path / "batch3.json"  # like openai's comparisons/batch*.json
    shutil.copy(FIXTURES / "tldr.jsonl", path)
    got = load_records("files", str(path))
    assert len(got) == 4 and got[3][1] == f"{path}:4"


def test_parquet_rows():
    path = FIXTURES / "ultrafeedback.parquet"
    got = load_records("files", str(path))
    assert [r for r, _ in got] == pq.read_table(path).to_pylist()
    assert got[2][1] == f"{path} row 2"
    assert got[0][0]["chosen"][1] == {
        "content": "Crimson leaves drifting\nslowly on the cooling wind\nthe year exhales gold",
        "role": "assistant",
    }


def test_glob_list_and_folder(tmp_path):
    for name in ("b.jsonl", "a.jsonl"):
        shutil.copy(FIXTURES / "kto.jsonl", tmp_path / name)
    shutil.copy(FIXTURES / "generic.json", tmp_path / "c.json")
    (tmp_path / "notes.txt").write_text("not data")
    got = load_records("files", str(tmp_path / "*.jsonl"))
    assert [o for _, o in got][::5] == [f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'b.jsonl'}:1"]
    assert len(got) == 10
    listed = load_records("files", [str(tmp_path / "c.json"), str(tmp_path / "b.jsonl")])
    assert [o for _, o in listed][3:5] == [
        f"{tmp_path / 'c.json'} row 3",
        f"{tmp_path / 'b.jsonl'}:1",
    ]
    folder = load_records("files", str(tmp_path))
    assert len(folder) == 14 and folder[-1][1] == f"{tmp_path / 'c.json'} row 3"


def test_malformed_json_line_names_file_and_line():
    path = FIXTURES / "bad_json.jsonl"
    with pytest.raises(DataError) as info:
        load_records("files", str(path))
    assert str(info.value) == (
        f"{path}:3: Expecting property name enclosed in double quotes (column 50)"
    )


def test_malformed_json_array_and_non_object_lines(tmp_path):
    array = tmp_path / "broken.json"
    array.write_text('[\n {"a": 1},\n {"a": 2\n]\n')
    with pytest.raises(DataError, match=rf"^{array}:4: Expecting ',' delimiter"):
        load_records("files", str(array))
    lines = tmp_path / "list.jsonl"
    lines.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=rf"^{lines}:2: expected a JSON object, got list$"):
        load_records("files", str(lines))


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        load_records("files", str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match=r"\*.parquet: no files match"):
        load_records("files", str(tmp_path / "*.parquet"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="data.csv: unknown file type"):
        load_records("files", str(tmp_path / "data.csv"))
    with pytest.raises(DataError, match="data.source='s3'"):
        load_records("s3", "x")
    (tmp_path / "empty.jsonl").write_text("\n")
    assert load_records("files", str(tmp_path / "empty.jsonl")) == []


def test_bad_rows_fixture_loads_and_keeps_missing_keys_missing():
    got = load_records("files", str(FIXTURES / "bad_rows.jsonl"))
    assert len(got) == 6 and "rejected" not in got[1][0]
    with pytest.raises(formats.BadRow, match="rejected: missing"):
        formats.convert(got[1][0], "generic")


def test_values_are_never_coerced(tmp_path):
    # one mistyped row used to send the whole file through a pandas fallback that turned
    # " 42" into 42 and "002" into 2 (and the good rows into bad ones)
    rows = [
        {"prompt": " 42", "chosen": "002", "rejected": "1e3"},
        {"prompt": "p", "chosen": 5, "rejected": [1, "x"]},
        {"prompt": "null", "chosen": "true", "rejected": " -0.0 ", "extra": 1.0},
        {"prompt": "q"},
        {"prompt": "\u2028 line\u2029sep\x85", "chosen": "\U0001f600", "rejected": ""},
    ]
    for name, text in [
        ("rows.jsonl", "".join(json.dumps(r) + "\n" for r in rows)),
        ("rows_raw.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)),
        ("rows.json", json.dumps(rows, indent=1)),
    ]:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        got = load_records("files", str(path))
        assert [r for r, _ in got] == rows
        for (r, _), want in zip(got, rows):
            assert [type(v) for v in r.values()] == [type(v) for v in want.values()]
        if name.endswith(".jsonl"):
            assert [o for _, o in got] == [f"{path}:{n}" for n in range(1, 6)]


def test_undecodable_and_pathological_lines_name_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: not UTF-8 text"):
        load_records("files", str(path))
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"a": 1}\n' + '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match=rf"^{deep}:2: JSON nested too deeply$"):
        load_records("files", str(deep))
    big = tmp_path / "bigint.jsonl"
    big.write_text('{"a": 1}\n{"a": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError, match=rf"^{big}:2: ValueError: Exceeds the limit"):
        load_records("files", str(big))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"a": "x"}\n')
    assert load_records("files", str(bom)) == [({"a": "x"}, f"{bom}:1")]


# ----------------------------------------------------------------------------- hub


def test_hub_name_loads_a_dataset_folder_by_split(tmp_path):
    repo = tmp_path / "my_prefs"
    repo.mkdir()
    chat = (FIXTURES / "generic_chat.jsonl").read_text(encoding="utf-8").splitlines()
    (repo / "train.jsonl").write_text("\n".join(chat) + "\n", encoding="utf-8")
    (repo / "test.jsonl").write_text("\n".join(chat[:1:-1]) + "\n", encoding="utf-8")
    want = json_lines(FIXTURES / "generic_chat.jsonl")
    got = load_records("hub", str(repo), split="test")
    assert [r for r, _ in got] == [want[3], want[2]]
    assert [o for _, o in got] == [f"{repo}[test] row 0", f"{repo}[test] row 1"]
    train = load_records("hub", str(repo), split="train[1:3]")
    assert [r for r, _ in train] == want[1:3]


def test_hub_schema_clash_is_one_data_error(tmp_path):
    repo = tmp_path / "clash"
    repo.mkdir()
    shutil.copy(FIXTURES / "generic_chat.jsonl", repo / "train.jsonl")
    shutil.copy(FIXTURES / "bad_rows.jsonl", repo / "test.jsonl")  # plain strings, not messages
    with pytest.raises(DataError, match=r"^hub dataset .*clash' split 'test': .*Couldn't cast"):
        load_records("hub", str(repo), split="test")


def test_hub_config_and_data_dir_are_passed_on(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list([{"chosen": "x", "rejected": "y"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    got = load_records("hub", "openai/summarize_from_feedback:comparisons", "validation")
    assert calls[-1] == (
        "openai/summarize_from_feedback",
        "comparisons",
        {"split": "validation", "data_dir": None},
    )
    assert got == [
        (
            {"chosen": "x", "rejected": "y"},
            "openai/summarize_from_feedback:comparisons[validation] row 0",
        )
    ]
    load_records("hub", "Anthropic/hh-rlhf", data_dir="helpful-base")
    assert calls[-1] == ("Anthropic/hh-rlhf", None, {"split": "train", "data_dir": "helpful-base"})

    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'Anthropic/hh-rlhf' on the Hub (LocalEntryNotFoundError)\nmore"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError,
        match=r"^hub dataset 'Anthropic/hh-rlhf' split 'train': ConnectionError: Couldn't reach",
    ):
        load_records("hub", "Anthropic/hh-rlhf")


# ----------------------------------------------------------------------------- tfds

_TINY_BUILDER = []


def tiny_tfds_builder():
    """A two-split TFDS builder in the UltraFeedback shape (registered once per process)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    if _TINY_BUILDER:
        return _TINY_BUILDER[0]
    messages = tfds.features.Sequence(
        {"role": tfds.features.Text(), "content": tfds.features.Text()}
    )

    class TrAlignTinyPrefs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {
                "prompt": tfds.features.Text(),
                "chosen": messages,
                "rejected": messages,
                "score_chosen": np.float32,
                "tags": tfds.features.Sequence(tfds.features.Text()),
            }
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(3), "test": self._generate_examples(2)}

        def _generate_examples(self, n):
            for i in range(n):
                q = {"role": "user", "content": f"Question {i}: é?"}
                yield (
                    i,
                    {
                        "prompt": f"Question {i}: é?",
                        "chosen": [q, {"role": "assistant", "content": f"good {i}"}],
                        "rejected": [q, {"role": "assistant", "content": f"bad {i}"}],
                        "score_chosen": 1.5 * i,
                        "tags": ["a", "b"][: i + 1],
                    },
                )

    _TINY_BUILDER.append(TrAlignTinyPrefs)
    return TrAlignTinyPrefs


def test_tfds_builder_records_look_like_hub_records(tmp_path):
    builder = tiny_tfds_builder()
    builder(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    got = load_records("tfds", "tr_align_tiny_prefs", "train", data_dir=str(tmp_path))
    assert [o for _, o in got] == [f"tr_align_tiny_prefs[train] row {i}" for i in range(3)]
    # TFDS stores examples in a shuffled (key-hash) order, so look records up by prompt.
    by_prompt = {r["prompt"]: r for r, _ in got}
    assert sorted(by_prompt) == ["Question 0: é?", "Question 1: é?", "Question 2: é?"]
    record = by_prompt["Question 1: é?"]
    assert record == {
        "prompt": "Question 1: é?",
        "chosen": [
            {"role": "user", "content": "Question 1: é?"},
            {"role": "assistant", "content": "good 1"},
        ],
        "rejected": [
            {"role": "user", "content": "Question 1: é?"},
            {"role": "assistant", "content": "bad 1"},
        ],
        "score_chosen": 1.5,
        "tags": ["a", "b"],
    }
    assert type(record["score_chosen"]) is float
    assert formats.convert(record, "ultrafeedback")["chosen"] == [
        {"role": "assistant", "content": "good 1"}
    ]
    full = load_records("tfds", "tr_align_tiny_prefs", "test", data_dir=str(tmp_path))
    sliced = load_records("tfds", "tr_align_tiny_prefs", "test[1:]", data_dir=str(tmp_path))
    assert [r for r, _ in sliced] == [r for r, _ in full][1:]
    assert [o for _, o in sliced] == ["tr_align_tiny_prefs[test[1:]] row 0"]


def test_tfds_unknown_dataset(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(
        DataError, match=r"^tfds dataset 'no_such_prefs_xyz' split 'train': DatasetNotFoundError"
    ):
        load_records("tfds", "no_such_prefs_xyz", data_dir=str(tmp_path))


def test_plain_decoding():
    value = {"a": np.array([b"x", b"y"], dtype=object), "b": np.int32(3), "c": [np.float32(0.5)]}
    assert sources._plain(value) == {"a": ["x", "y"], "b": 3, "c": [0.5]}


def test_gzipped_json_lines(tmp_path):
    import gzip

    path = tmp_path / "train.jsonl.gz"  # how Anthropic/hh-rlhf ships its files
    with gzip.open(path, "wb") as f:
        f.write((FIXTURES / "hh.jsonl").read_bytes())
    got = load_records("files", str(path))
    assert [r for r, _ in got] == json_lines(FIXTURES / "hh.jsonl")
    assert got[-1][1] == f"{path}:8"
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wb") as f:
        f.write((FIXTURES / "bad_json.jsonl").read_bytes())
    with pytest.raises(DataError, match=rf"^{bad}:3: Expecting property name"):
        load_records("files", str(bad))
