"""Raw record sources: local JSON / JSON Lines / Parquet files, the Hugging Face hub, TFDS.

``load_records(source, path, split)`` returns every record as ``(record, origin)``, where the
record is a plain dict (str, int, float, bool, None, lists, dicts) and ``origin`` says where it
came from, for error messages and ``data inspect``:

- ``files``: ``path`` is a file, a glob, a folder or a list of them (``.json``, ``.jsonl``,
  ``.parquet``; ``.json.gz``/``.jsonl.gz`` too); origin ``FILE:LINE`` for JSON Lines (1-based
  line), ``FILE row N`` for a JSON array or Parquet (0-based row).
- ``hub``: ``path`` is a dataset name, ``NAME`` or ``NAME:CONFIG``
  (``openai/summarize_from_feedback:comparisons``); origin ``NAME[split] row N``.
- ``tfds``: ``path`` is a TFDS name (``name``, ``name/config``, ``name:version``); origin
  ``NAME[split] row N``.

JSON and JSON Lines files are read with the ``json`` module, so every value is exactly what the
file holds (a string stays a string, a missing key stays missing; ``datasets``' JSON builder
unifies column types and turns number-like strings into numbers when a column mixes types);
a ``.json`` file that does not start with ``[`` is JSON Lines (as the OpenAI
summarize-from-feedback ``comparisons/batch*.json`` files are). A malformed JSON line, a line
that is not a JSON object, or bytes that are not UTF-8 raise ``DataError("FILE:LINE: ...")``;
a record whose fields have the wrong type is returned as it is and becomes a bad row of its
own (``formats.convert``), never affecting its neighbours. Parquet files are read with
``datasets.load_dataset("parquet", data_files=...)``. Hub datasets are loaded with
``datasets.load_dataset(name, config, split=split, data_dir=data_dir)`` (downloads when online,
the normal HF cache otherwise; ``data_dir`` picks a sub-folder, e.g. ``helpful-base`` of
``Anthropic/hh-rlhf``). TFDS datasets are read without TensorFlow through ``tfds.data_source``,
which needs the data prepared in ``array_record`` format (``tfds build --file_format=array_record``
or ``builder.download_and_prepare(file_format="array_record")``); ``data_dir`` is the TFDS data
folder. Bytes are decoded to str and TFDS ``Sequence({...})`` features become lists of dicts, so a
TFDS record has the same shape as the hub's.
"""

from __future__ import annotations

import glob
import gzip
import json
import os

import numpy as np

from tr_align.errors import DataError

SOURCES = ("files", "hub", "tfds")
FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_records(
    source: str, path: str | list[str], split: str = "train", *, data_dir: str | None = None
) -> list[tuple[dict, str]]:
    """All records of one source as ``(record, origin)`` pairs (see the module docstring).

    ``split`` applies to ``hub`` and ``tfds`` (slices such as ``"train[:1000]"`` work there);
    local files are read whole, one file after another in the given (glob: sorted) order.
    E.g. ``load_records("files", "data/hh/*.jsonl")`` -> ``[({"chosen": ..., "rejected": ...},
    "data/hh/train.jsonl:1"), ...]``; ``load_records("hub", "Anthropic/hh-rlhf",
    data_dir="helpful-base")``; ``load_records("tfds", "my_prefs", "test", data_dir="~/tfds")``.
    """
    if source == "files":
        return [pair for f in expand_files(path) for pair in _load_file(f)]
    if not isinstance(path, str) or not path:
        raise DataError(f"data.path={path!r}: source {source!r} needs one dataset name")
    if source == "hub":
        return _load_hub(path, split, data_dir)
    if source == "tfds":
        return _load_tfds(path, split, data_dir)
    raise DataError(f"data.source={source!r}: expected one of {SOURCES}")


# ----------------------------------------------------------------------------- files


def expand_files(path: str | os.PathLike | list) -> list[str]:
    """A file, glob, folder, or list of them -> the list of data files (globs sorted).

    A folder stands for the ``.json``/``.jsonl``/``.parquet`` files directly inside it.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise DataError("data.path: no files given")
    files = []
    for p in map(os.fspath, paths):
        if any(c in p for c in "*?["):
            matches = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
            if not matches:
                raise DataError(f"{p}: no files match")
            files += matches
        elif os.path.isdir(p):
            matches = sorted(os.path.join(p, f) for f in os.listdir(p) if _ext(f) in FILE_TYPES)
            if not matches:
                raise DataError(f"{p}: folder holds no {'/'.join(FILE_TYPES)} files")
            files += matches
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise DataError(f"{p}: no such file")
    for f in files:
        if _ext(f) not in FILE_TYPES:
            raise DataError(f"{f}: unknown file type; expected {', '.join(FILE_TYPES)}")
    return files


def _ext(path):
    """The data extension, looking through a ``.gz`` suffix (``train.jsonl.gz`` -> ``.jsonl``)."""
    root, ext = os.path.splitext(path.lower())
    return os.path.splitext(root)[1] if ext == ".gz" else ext


def _open(path, mode="rb"):
    if path.lower().endswith(".gz"):
        return gzip.open(path, mode)
    return open(path, mode)


def _first_char(text):
    """The first non-whitespace character of a text ('' if there is none)."""
    stripped = text.lstrip()
    return stripped[:1]


def _first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _root_cause(e):
    while e.__cause__ is not None:
        e = e.__cause__
    return _first_line(e)


def _describe(e):
    """``Outer: message`` plus the innermost cause when that says more."""
    outer, root = _first_line(e), _root_cause(e)
    return outer if root == outer else f"{outer} ({root})"


def _read_text(path):
    """The file's text (UTF-8, an optional BOM dropped); undecodable bytes -> FILE:LINE."""
    with _open(path) as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason})") from None


def _parse(text, where):
    """``json.loads`` with every failure as ``DataError("WHERE: ...")``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where(e.lineno)}: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{where(None)}: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise DataError(f"{where(None)}: {_first_line(e)}") from None


def _load_json(path):
    """Records of a ``.json``/``.jsonl`` file, every value exactly as JSON wrote it.

    Read with the ``json`` module, not ``datasets``: its JSON builder unifies each column's type
    over the file and, when a column mixes types (one row's ``"chosen": 5``), falls back to
    pandas, which turns number-like strings into numbers (``" 42"`` -> 42, ``"002"`` -> 2) and
    so spoils the neighbours of the mistyped row. Here a string stays a string, a missing key
    stays missing, and a mistyped field only makes its own row bad (``formats.convert``).
    """
    text = _read_text(path)
    first = _first_char(text)
    if first == "":
        return []  # an empty JSON file holds no records
    if first == "[":  # one JSON array of objects
        rows = _parse(text, lambda line: f"{path}:{line}" if line else path)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path}: expected a list of JSON objects")
        return [(row, f"{path} row {i}") for i, row in enumerate(rows)]
    out = []  # JSON Lines; split on "\n" only (U+2028 and friends may sit inside strings)
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        row = _parse(line, lambda _, n=n: f"{path}:{n}")
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        out.append((row, f"{path}:{n}"))
    return out


def _load_file(path):
    if FILE_TYPES[_ext(path)] == "json":
        return _load_json(path)
    import datasets

    try:
        rows = datasets.load_dataset("parquet", data_files=path, split="train").to_list()
    except Exception as e:
        raise DataError(f"{path}: could not read: {_describe(e)}") from e
    return [(row, f"{path} row {i}") for i, row in enumerate(rows)]


# ----------------------------------------------------------------------------- hub


def _load_hub(name, split, data_dir):
    import datasets

    repo, config = name, None
    if ":" in name and "/" not in name.rsplit(":", 1)[1]:
        repo, config = name.rsplit(":", 1)
    try:
        ds = datasets.load_dataset(repo, config, split=split, data_dir=data_dir)
    except Exception as e:
        raise DataError(f"hub dataset {name!r} split {split!r}: {_describe(e)}") from e
    return [(row, f"{name}[{split}] row {i}") for i, row in enumerate(ds.to_list())]


# ----------------------------------------------------------------------------- tfds


def _load_tfds(name, split, data_dir):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            "data.source='tfds' needs tensorflow-datasets: pip install 'tr_align[tfds]'"
        ) from e
    try:
        src = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:
        raise DataError(f"tfds dataset {name!r} split {split!r}: {_describe(e)}") from e
    features = src.dataset_info.features
    out = []
    for start in range(0, len(src), 1024):
        rows = src.__getitems__(range(start, min(start + 1024, len(src))))
        for i, row in enumerate(rows, start):
            out.append((_from_tfds(row, features, tfds), f"{name}[{split}] row {i}"))
    return out


def _from_tfds(value, feature, tfds):
    """A TFDS example -> plain Python, shaped like the hub's (lists of dicts, str)."""
    f = tfds.features
    if isinstance(feature, f.FeaturesDict):
        return {k: _from_tfds(value[k], feature[k], tfds) for k in feature.keys()}
    if isinstance(feature, f.Sequence) and isinstance(feature.feature, f.FeaturesDict):
        inner = feature.feature
        n = len(value[next(iter(inner.keys()))]) if inner.keys() else 0
        return [
            {k: _from_tfds(value[k][i], inner[k], tfds) for k in inner.keys()} for i in range(n)
        ]
    return _plain(value)


def _plain(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
